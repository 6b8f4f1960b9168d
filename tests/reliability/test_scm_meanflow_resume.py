"""Bit-exact resume for sCD and MeanFlow (issue 19): `lit-gen fit` of the real toy2d recipe (shortened) straight to
N steps, and again stopped at step k — inside sCD's tangent warm-up (r_k still rising), MeanFlow mid learning-rate
warm-up — then resumed with `--ckpt_path last`; the final checkpoints must agree exactly (weights, the adaptive weight
MLP, EMA, optimizer, RNG states, data position), as tests/reliability/test_method_resume.py checks for the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_gen.export import read_checkpoint
from tests.conftest import REPO, run_cli
from tests.reliability.test_method_resume import assert_equal

pytestmark = pytest.mark.slow

# method -> (recipe, needs a teacher, total steps, stop step, overrides)
CASES: dict[str, tuple[str, bool, int, int, tuple[str, ...]]] = {
    "scd": ("scm", True, 8, 3, ("--model.init_args.tangent_warmup_steps", "6", "--model.init_args.decay_steps", "8")),
    "meanflow": ("meanflow", False, 8, 3, ("--model.init_args.warmup_steps", "5",
                                            "--model.init_args.decay_steps", "8")),
}  # fmt: skip


def fit(method: str, shards: Path, teacher: Path, root: Path, steps: int, workers: int, *extra: str) -> Path:
    recipe, needs_teacher, _, _, overrides = CASES[method]
    args = ["fit", "-c", REPO / f"recipes/toy2d/{recipe}.yaml", "--data.init_args.shards", shards,
            "--data.init_args.batch_size", "64", "--data.init_args.num_workers", workers,
            "--trainer.default_root_dir", root, "--trainer.max_steps", steps,
            "--trainer.enable_progress_bar", "false", *overrides, *extra]  # fmt: skip
    if needs_teacher:
        args += ["--model.init_args.teacher", teacher]
    run_cli(*args)
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("method", list(CASES))
def test_stop_and_resume_is_bit_exact(
    method: str, workers: int, toy_shards: Path, toy_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = toy_teacher_run / "checkpoints" / "last.ckpt"
    _, _, total, stop, _ = CASES[method]
    straight = read_checkpoint(fit(method, toy_shards, teacher, tmp_path / "a", total, workers))
    stopped = read_checkpoint(fit(method, toy_shards, teacher, tmp_path / "b", stop, workers))
    assert stopped["global_step"] == stop
    resumed = read_checkpoint(fit(method, toy_shards, teacher, tmp_path / "b", total, workers, "--ckpt_path", "last"))
    assert straight["global_step"] == resumed["global_step"] == total
    if method == "scd":
        assert any(k.startswith("weight_net.") for k in resumed["state_dict"])  # w_φ is saved and resumed
    for section in ("state_dict", "ema_state_dict", "optimizer_states", "lr_schedulers", "rng_states",
                    "ShardDataModule", "lit_gen"):  # fmt: skip
        assert (section in straight) == (section in resumed), section
        if section in straight:
            assert_equal(straight[section], resumed[section], section)
    state = stopped["state_dict"]
    trained = [k for k in state if k.startswith("net.")]
    assert any(not torch.equal(state[k], resumed["state_dict"][k]) for k in trained)
