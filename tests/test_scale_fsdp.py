"""FSDP2 (lit_gen.scale.fsdp.FSDP, recipes/scale/fsdp_cpu.yaml) on 2 CPU processes over gloo: fit -> stop -> resume
bit-exactly -> export for the teacher and f-distill (whose teacher is an FSDP folder), agreement with DDP, a kill
during a save, and the refusals (one line each).

Marked multiprocess (they still run in CI): every run is a `lit-gen` subprocess (Lightning starts the second rank).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_gen.errors import LitGenError
from lit_gen.export import export, load_model, read_checkpoint, read_model_file
from lit_gen.methods.distill import DistillationMethod
from lit_gen.scale.fsdp import (
    COMPLETE_FILE,
    _safe_reader,
    check_precision,
    read_fsdp_tensors,
    sharding_plan,
    state_bytes_per_rank,
)
from tests.cli_runs import TouchExploit, run_lit_gen
from tests.cli_runs import toy_teacher_fit as teacher_fit
from tests.conftest import REPO

FSDP_CPU = ["-c", str(REPO / "recipes/scale/fsdp_cpu.yaml")]
DDP_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def lit_gen(*args: str, expect: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_lit_gen(*args, expect=expect, timeout=timeout)


def fdistill_fit(shards: Path, teacher: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit", "-c", str(REPO / "recipes/toy2d/fdistill.yaml"), f"--data.init_args.shards={shards}",
        f"--model.init_args.teacher={teacher}", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=128", *extra,
    ]  # fmt: skip


def assert_same_state(a: Path, b: Path) -> None:
    """Weights, EMA and optimizer state of two FSDP folders are bit-identical."""
    tops = ("state_dict", "ema_state_dict", "optimizer_0")
    ta, tb = read_fsdp_tensors(a, tops), read_fsdp_tensors(b, tops)
    assert ta.keys() == tb.keys() and {"state_dict", "optimizer_0"} <= ta.keys()
    for top in ta:
        assert ta[top].keys() == tb[top].keys(), top
        for key in ta[top]:
            assert torch.equal(ta[top][key], tb[top][key]), f"{top}.{key} differs"


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def fsdp_teacher(toy_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-step FSDP toy2d teacher (with the EMA callback): its last.ckpt folder."""
    root = tmp_path_factory.mktemp("fsdp") / "teacher"
    lit_gen(*teacher_fit(toy_shards, root, 12, *FSDP_CPU))
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def sampling(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """An overlay whose sample grid fires every 4 steps: rank 0 samples from a sharded generator EMA."""
    overlay = tmp_path_factory.mktemp("overlay") / "sampling.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.checkpoint.Checkpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 250, save_top_k: 0}\n"
        "    - class_path: callbacks.sample_grid.SampleGrid\n      init_args: {every_n_steps: 4, n: 64}\n"
    )
    return ["-c", str(overlay)]


@pytest.fixture(scope="module")
def fsdp_fdistill(
    toy_shards: Path, fsdp_teacher: Path, sampling: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An 8-step FSDP f-distill run (update_ratio 2, GAN head, module-owned EMA) of the FSDP teacher folder."""
    root = tmp_path_factory.mktemp("fsdp") / "fdistill"
    lit_gen(*fdistill_fit(toy_shards, fsdp_teacher, root, 8, *FSDP_CPU, *sampling))
    assert sorted(p.name for p in (root / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]
    return root / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------------------------------ no processes
def test_precision_check_and_sharding_plan() -> None:
    for ok in ("32-true", "bf16-mixed", "bf16-true", "16-true", None, "32"):
        check_precision(ok)
    for bad in ("16-mixed", "16", "64-true"):
        with pytest.raises(LitGenError, match="FSDP .* cannot train with precision") as info:
            check_precision(bad)
        assert "\n" not in str(info.value)

    from lit_gen.methods.teacher import TeacherDiffusion
    from lit_gen.nets import MLPDenoiser

    teacher = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=16, depth=2))
    assert sharding_plan(teacher) == (["net"], [])

    class Tract(nn.Module):
        method_name = "tract"

    with pytest.raises(LitGenError, match="tested for the teacher and fdistill methods, not 'tract'"):
        sharding_plan(Tract())

    net = nn.Linear(3, 4)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert state_bytes_per_rank(net, optimizer) == {"params": 64, "frozen_params": 0, "grads": 64, "optimizer": 128}


def test_fsdp_overlays_parse_and_16_mixed_is_refused_while_parsing() -> None:
    from lit_gen.cli import lightning_cli

    teacher = ["-c", str(REPO / "recipes/toy2d/teacher.yaml")]
    for overlay in ("fsdp.yaml", "fsdp_cpu.yaml"):
        cli = lightning_cli([*teacher, "-c", str(REPO / "recipes/scale" / overlay)], run=False, instantiate=False)
        assert cli.config.trainer.strategy.class_path == "lit_gen.scale.fsdp.FSDP"
    with pytest.raises(LitGenError, match="cannot train with precision '16-mixed'"):
        lightning_cli([*teacher, *FSDP_CPU, "--trainer.precision=16-mixed"], run=False, instantiate=False)


# ------------------------------------------------------------------------------------------------ the teacher
@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_teacher_folder_is_sharded_complete_and_exports(fsdp_teacher: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in fsdp_teacher.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", COMPLETE_FILE, "meta.pt"], names
    assert sorted(p.name for p in fsdp_teacher.parent.iterdir()) == ["last.ckpt"]  # no .partial / .old left over
    record = json.loads((fsdp_teacher / COMPLETE_FILE).read_text())
    assert record["world_size"] == 2 and record["global_step"] == 12
    # The network, its EMA and Adam's moments are sharded: each weight matrix is stored as one chunk per rank.
    items = _safe_reader(fsdp_teacher).read_metadata().state_dict_metadata
    for key in ("state_dict.net.map_cond.0.weight", "ema_state_dict.net.map_cond.0.weight",
                "optimizer_0.state.net.map_cond.0.weight.exp_avg"):  # fmt: skip
        assert [list(c.offsets) for c in items[key].chunks] == [[0, 0], [128, 0]], key

    checkpoint = read_checkpoint(fsdp_teacher)
    assert checkpoint["global_step"] == 12 and checkpoint["lit_gen"]["method"] == "teacher"
    assert checkpoint["lit_gen"]["net"]["class_path"] == "lit_gen.nets.mlp.MLPDenoiser"  # not FSDP's subclass
    raw_file = export(fsdp_teacher, tmp_path / "raw.safetensors", weights="raw")
    ema_file = export(fsdp_teacher, tmp_path / "ema.safetensors")
    full = read_fsdp_tensors(fsdp_teacher)
    _, raw = read_model_file(raw_file, "raw")
    _, ema = read_model_file(ema_file)
    assert raw.keys() == ema.keys() and len(raw) > 10
    assert all(torch.equal(v, full["state_dict"][f"net.{k}"].float()) for k, v in raw.items())
    assert all(
        torch.equal(ema[k], full["ema_state_dict"][f"net.{k}"]) for k in ema if f"net.{k}" in full["ema_state_dict"]
    )
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert torch.isfinite(load_model(ema_file).sample(16, steps=4)).all()
    student = DistillationMethod(teacher=str(fsdp_teacher))  # the folder as --model.init_args.teacher
    assert all(torch.equal(v, ema[k]) for k, v in student.teacher_net.state_dict().items())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_teacher_stop_and_resume_is_bit_exact(fsdp_teacher: Path, toy_shards: Path, tmp_path: Path) -> None:
    lit_gen(*teacher_fit(toy_shards, tmp_path, 5, *FSDP_CPU))
    proc = lit_gen(*teacher_fit(toy_shards, tmp_path, 12, *FSDP_CPU), "--ckpt_path", "last")
    assert "Restored all states" in proc.stdout + proc.stderr
    assert_same_state(fsdp_teacher, tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_teacher_matches_ddp(fsdp_teacher: Path, toy_shards: Path, tmp_path: Path) -> None:
    """Same seed, data and world size: FSDP's reduce-scattered gradients give DDP's weights up to fp32 rounding."""
    lit_gen(*teacher_fit(toy_shards, tmp_path, 12, *DDP_CPU))
    fsdp, ddp = read_checkpoint(fsdp_teacher), read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert max_difference(fsdp["state_dict"], ddp["state_dict"]) < 1e-5
    assert max_difference(fsdp["ema_state_dict"], ddp["ema_state_dict"]) < 1e-5


# ------------------------------------------------------------------------------------------------ f-distill
@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_fdistill_resume_is_bit_exact_and_exports(
    fsdp_fdistill: Path, fsdp_teacher: Path, sampling: list[str], toy_shards: Path, tmp_path: Path
) -> None:
    """Stopped at step 5 (mid update-ratio cycle: the next step trains the critics only) and resumed to 8."""
    lit_gen(*fdistill_fit(toy_shards, fsdp_teacher, tmp_path, 5, *FSDP_CPU, *sampling))
    lit_gen(*fdistill_fit(toy_shards, fsdp_teacher, tmp_path, 8, *FSDP_CPU, *sampling), "--ckpt_path", "last")
    assert_same_state(fsdp_fdistill, tmp_path / "checkpoints" / "last.ckpt")

    tensors = read_fsdp_tensors(fsdp_fdistill, ("state_dict", "optimizer_0"))
    state, optimizer = tensors["state_dict"], tensors["optimizer_0"]
    assert int(state["updates"]) == 8 and int(state["generator_updates"]) == 4
    # The frozen teacher: the FSDP teacher's EMA weights, replicated (one chunk), no optimizer state.
    _, teacher_ema = read_model_file(fsdp_teacher)
    assert all(torch.equal(state[f"teacher_net.{k}"], v) for k, v in teacher_ema.items())
    items = _safe_reader(fsdp_fdistill).read_metadata().state_dict_metadata
    assert len(items["state_dict.teacher_net.map_cond.0.weight"].chunks) == 1
    assert len(items["state_dict.fake_net.map_cond.0.weight"].chunks) == 2
    owners = {k.split(".")[1] for k in optimizer if k.startswith("state.")}
    assert owners == {"net", "fake_net", "disc"}, owners
    # Adam steps per group: the generator trained on 4 of the 8 steps, the critics on all (f-distill's scheme).
    steps = {k.split(".")[1]: int(v) for k, v in optimizer.items() if k.startswith("state.") and k.endswith(".step")}
    assert steps == {"net": 4, "fake_net": 8, "disc": 8}, steps

    description, weights = read_model_file(fsdp_fdistill)
    assert description["weights"] == "ema" and all(torch.equal(v, state[f"net_ema.{k}"]) for k, v in weights.items())
    model = load_model(export(fsdp_fdistill, tmp_path / "student.safetensors"))
    assert torch.isfinite(model.sample(64)).all()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_fdistill_matches_ddp_and_refuses_another_world_size(
    fsdp_fdistill: Path, fsdp_teacher: Path, toy_shards: Path, tmp_path: Path
) -> None:
    lit_gen(*fdistill_fit(toy_shards, fsdp_teacher, tmp_path / "ddp", 8, *DDP_CPU))
    fsdp, ddp = read_checkpoint(fsdp_fdistill), read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert max_difference(fsdp["state_dict"], ddp["state_dict"]) < 1e-4

    copy = tmp_path / "copy"
    shutil.copytree(fsdp_fdistill.parent.parent, copy)
    proc = lit_gen(*fdistill_fit(toy_shards, fsdp_teacher, copy, 10, *FSDP_CPU, "--trainer.devices=1"),
                   "--ckpt_path", "last", expect=2)  # fmt: skip
    assert "written by 2 FSDP ranks but this run has 1" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ failures
@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_kill_during_save_resumes_from_a_complete_checkpoint(toy_shards: Path, tmp_path: Path) -> None:
    """SIGKILL to both ranks as soon as a second save has begun: last.ckpt is the previous complete folder, and
    `--ckpt_path last` finishes the run from it."""
    overlay = tmp_path / "often.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.checkpoint.Checkpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 2, save_top_k: 0}\n"
        "    - class_path: callbacks.ema.EMA\n      init_args: {halflife_steps: 20}\n"
        "    - class_path: callbacks.sample_grid.SampleGrid\n      init_args: {every_n_steps: 2, n: 64, steps: 2}\n"
    )
    root = tmp_path / "run"
    args = teacher_fit(toy_shards, root, 400, *FSDP_CPU, "-c", str(overlay))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lit_gen.cli", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last, partial = root / "checkpoints" / "last.ckpt", root / "checkpoints" / "last.ckpt.partial"
    deadline = time.time() + 120
    try:
        while not (last.exists() and partial.exists()) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank-1 process it started
        proc.wait(timeout=30)
    step = read_checkpoint(last)["global_step"]  # complete: marker, metadata and shards all present
    assert step >= 2 and step % 2 == 0
    lit_gen(*teacher_fit(toy_shards, root, step + 2, *FSDP_CPU, "-c", str(overlay)), "--ckpt_path", "last")
    assert read_checkpoint(last)["global_step"] == step + 2
    assert (root / "samples" / f"step_{step + 2:07d}.png").is_file()  # rank 0 sampled the sharded EMA network


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fsdp_refusals_are_one_line(fsdp_teacher: Path, toy_shards: Path, tmp_path: Path) -> None:
    # An incompatible precision: refused while the recipe is parsed, before any process or network exists.
    proc = lit_gen(*teacher_fit(toy_shards, tmp_path / "fp16", 4, *FSDP_CPU, "--trainer.precision=16-mixed"), expect=2)
    assert "cannot train with precision '16-mixed'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "fp16").exists()
    # A method FSDP is not tested with.
    args = ["fit", "-c", str(REPO / "recipes/toy2d/tract.yaml"), f"--data.init_args.shards={toy_shards}",
            f"--model.init_args.teacher={fsdp_teacher}", f"--trainer.default_root_dir={tmp_path / 'tract'}",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", *FSDP_CPU]  # fmt: skip
    proc = lit_gen(*args, expect=2)
    assert "not 'tract'" in proc.stderr and "Traceback" not in proc.stderr

    # A folder whose save did not finish (no completion marker): refused by export and by resume.
    torn = tmp_path / "torn" / "checkpoints" / "last.ckpt"
    shutil.copytree(fsdp_teacher, torn)
    (torn / COMPLETE_FILE).unlink()
    with pytest.raises(LitGenError, match="not a complete FSDP checkpoint"):
        read_checkpoint(torn)
    proc = lit_gen(*teacher_fit(toy_shards, tmp_path / "torn", 14, *FSDP_CPU), "--ckpt_path", str(torn), expect=2)
    assert "not a complete FSDP checkpoint" in proc.stderr and "Traceback" not in proc.stderr

    # Hostile or damaged files: one line naming the file, nothing executed.
    hostile = pickle.dumps(TouchExploit(tmp_path / "pwned"))
    for name, target, payload, expected in (
        ("hostile_meta", "meta.pt", hostile, "refusing to load FSDP checkpoint"),
        ("hostile_index", ".metadata", hostile, "refusing to load FSDP checkpoint"),
        ("damaged_meta", "meta.pt", bytes(range(256)) * 8, "cannot read FSDP checkpoint file"),
        ("damaged_shard", "__1_0.distcp", b"\0" * 64, "cannot read FSDP checkpoint"),
    ):
        copy = tmp_path / name / "last.ckpt"
        shutil.copytree(fsdp_teacher, copy)
        (copy / target).write_bytes(payload)
        with pytest.raises(LitGenError) as info:
            read_checkpoint(copy)
        message = str(info.value)
        assert expected in message and "\n" not in message, message
    assert not (tmp_path / "pwned").exists()
