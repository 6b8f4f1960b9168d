"""``lit-gen eval`` (through its own argparse wiring, ``lit_gen.eval.command.add_parser``) on a trained toy2d teacher,
and the evaluation callback logging during training."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.ema import EMA
from callbacks.evaluate import Evaluate
from lit_gen.data.datamodule import ShardDataModule
from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError
from lit_gen.eval import evaluate
from lit_gen.eval.command import add_parser
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser
from tests.conftest import run_cli


def eval_cli(*args: object) -> list[dict]:
    parser = argparse.ArgumentParser(prog="lit-gen")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    ns = parser.parse_args(["eval", *[str(a) for a in args]])
    return ns.func(ns)


def _table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:]]


@pytest.mark.slow
def test_eval_prints_finite_metrics_for_a_toy_teacher(toy_teacher_run: Path, toy_shards: Path, tmp_path, capsys):
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "rows.json"
    rows = eval_cli(
        "--ckpt", ckpt, "--ref", toy_shards, "--steps", 1, 18, "--sampler", "euler", "--n", 2000, "--out", out
    )  # fmt: skip
    table = _table(capsys.readouterr().out)
    assert [r["steps"] for r in table] == ["1", "18"] and [r["NFE"] for r in table] == ["1", "18"]
    assert {"fd", "mode_tv", "off_mode", "modes_covered"} <= set(table[0])  # gmm8 shards: mixture metrics by default
    one, many = (float(r["fd"]) for r in table)
    assert math.isfinite(one) and math.isfinite(many) and many < one  # more steps, closer to the data
    assert rows[1]["modes_covered"] == 8 and rows[1]["off_mode"] < 0.5 * rows[0]["off_mode"]
    assert json.loads(out.read_text()) == rows
    # --json prints the same rows; the in-process API gives them too (same seed: same numbers).
    eval_cli("--ckpt", ckpt, "--ref", toy_shards, "--steps", 18, "--sampler", "euler", "--n", 2000, "--json")
    printed = json.loads(capsys.readouterr().out)
    api = evaluate(ckpt, toy_shards, steps=[18], sampler="euler", n=2000)
    assert printed == api == rows[1:]


@pytest.mark.slow
def test_eval_refuses_mismatched_reference_and_bad_arguments(toy_teacher_run: Path, tmp_path: Path) -> None:
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    digits = tmp_path / "digits"
    write_shards("builtin:digits", digits)
    with pytest.raises(LitGenError, match=r"generates points \[2\], but .* holds image \[1, 8, 8\]"):
        eval_cli("--ckpt", ckpt, "--ref", digits, "--metric", "fd_raw", "--n", 16)
    with pytest.raises(LitGenError, match="do not exist"):
        eval_cli("--ckpt", ckpt, "--ref", tmp_path / "missing")
    with pytest.raises(LitGenError, match="--steps must be at least 1"):
        eval_cli("--ckpt", ckpt, "--ref", digits, "--steps", 0)
    with pytest.raises(LitGenError, match="does not exist"):
        eval_cli("--ckpt", tmp_path / "none.ckpt", "--ref", digits, "--metric", "fd_raw")


@pytest.mark.slow
def test_lit_gen_eval_is_wired(toy_teacher_run: Path, toy_shards: Path, capsys) -> None:
    from lit_gen import cli

    if "eval" not in cli._tools_parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        pytest.skip("lit-gen eval is not wired into lit_gen.cli yet")
    run_cli("eval", "--ckpt", toy_teacher_run / "checkpoints" / "last.ckpt", "--ref", toy_shards, "--n", 500)
    assert math.isfinite(float(_table(capsys.readouterr().out)[0]["fd"]))


@pytest.mark.slow
def test_callback_logs_metrics_from_the_ema_weights(toy_shards: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    callback = Evaluate(ref=str(toy_shards), every_n_steps=10, metrics=["fd", "mixture"], steps=[1, 4], n=400)
    ema = EMA(halflife_steps=5)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=25, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ema, callback], default_root_dir=tmp_path, log_every_n_steps=7,
    )  # fmt: skip
    module = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=64, depth=2))
    trainer.fit(module, datamodule=ShardDataModule(shards=str(toy_shards), batch_size=128, num_workers=0))
    expected = {f"eval/{k}_{s}step" for k in ("fd", "mode_tv", "off_mode", "modes_covered") for s in (1, 4)}
    assert set(callback.last) == expected and all(math.isfinite(v) for v in callback.last.values())
    assert "eval/fd_1step" in trainer.callback_metrics
    # The logged numbers are those of the EMA weights, not the raw ones (evaluated again here, same seed).
    with ema.averaged(module) as net:
        from lit_gen.export import LoadedModel

        model = LoadedModel(net=net, param=module.param, description=module.describe())
        again = callback._evaluator.evaluate(model, steps=[1], n=400, seed=0)[0]["fd"]
    raw = callback._evaluator.evaluate(
        LoadedModel(net=module.net, param=module.param, description=module.describe()), steps=[1], n=400, seed=0
    )[0]["fd"]
    assert callback.last["eval/fd_1step"] == pytest.approx(again) and again != pytest.approx(raw)
    # TensorBoard holds the metric at every interval and at the last step (25 is not a multiple of 10).
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fd_1step")] == [10, 20, 25]
    assert events.Scalars("eval/fd_4step")[-1].value == pytest.approx(callback.last["eval/fd_4step"])


def test_callback_fails_before_training_on_a_bad_reference(tmp_path: Path) -> None:
    callback = Evaluate(ref=str(tmp_path / "missing"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, callbacks=[callback])
    module = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=16, depth=1))
    with pytest.raises(LitGenError, match="reference shards .*missing do not exist"):
        callback.setup(trainer, module, "fit")


def test_callback_samples_from_a_method_owned_ema() -> None:
    """Methods that keep their own inference EMA (``describe()["ema_prefix"]``, e.g. TRACT, f-distill) are evaluated
    on it; otherwise on the EMA callback's average; else on ``net``."""
    import copy
    from types import SimpleNamespace

    module = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=16, depth=1))
    trainer = SimpleNamespace(callbacks=[])
    with Evaluate._weights(trainer, module) as net:
        assert net is module.net
    module.net_ema = copy.deepcopy(module.net)
    describe = module.describe
    module.describe = lambda: {**describe(), "ema_prefix": "net_ema."}  # type: ignore[method-assign]
    with Evaluate._weights(SimpleNamespace(callbacks=[EMA()]), module) as net:
        assert net is module.net_ema


def test_cli_help_names_every_metric_without_importing_torch() -> None:
    import subprocess
    import sys

    from lit_gen.eval.command import METRIC_HELP, METRIC_NAMES
    from lit_gen.eval.runner import METRICS

    assert all(f"{name}:" in METRIC_HELP for name in METRICS)
    assert set(METRIC_NAMES) == set(METRICS)  # the --metric line lists exactly the runner's metrics
    code = (
        "import argparse, sys; from lit_gen.eval.command import add_parser; "
        "add_parser(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
