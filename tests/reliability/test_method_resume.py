"""Bit-exact resume for every method, with `num_workers` 0 and 2 (issue 9, item 1; sCD and MeanFlow: issue 19).

Each case runs `lit-gen fit` of the method's real toy2d recipe (shortened) straight to N steps, and again stopped at
step k — inside a TRACT phase, before CD's curriculum doubles N, in the middle of f-distill's update-ratio cycle,
inside sCD's tangent warm-up (r_k still rising), mid MeanFlow's learning-rate warm-up — then resumed with
`--ckpt_path last` to N. The two final checkpoints must agree exactly: every module tensor (raw weights,
method-owned EMA / self-teacher / target networks, sCM's adaptive weight MLP, counters), the EMA callback's weights,
the optimizer state, the per-rank RNG states and the data stream's position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lit_gen.export import read_checkpoint
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

# method -> (recipe, needs a teacher, total steps, stop step, overrides)
CASES: dict[str, tuple[str, bool, int, int, tuple[str, ...]]] = {
    "teacher": ("teacher", False, 10, 4, ("--model.init_args.decay_steps", "10",
                                          "--model.init_args.warmup_steps", "3")),
    # 8 -> 2 -> 1: phase 0 is steps 0-5, the stop at 8 falls two steps into phase 1.
    "tract": ("tract", True, 12, 8, ("--model.init_args.schedule", "[8, 2, 1]",
                                     "--model.init_args.steps_per_phase", "[6, 6]")),
    # N = 11 doubles to 21 at step 4 (curriculum of 8 steps over two levels): the stop at 3 is before it.
    "cd": ("cd", True, 8, 3, ("--model.init_args.num_scales", "21", "--model.init_args.curriculum_steps", "8",
                              "--model.init_args.initial_scales", "11", "--model.init_args.decay_steps", "8")),
    # update ratio 3: generator steps at 0, 3, 6, 9; the stop at 5 is one critic step into a cycle.
    "fdistill": ("fdistill", True, 10, 5, ("--model.init_args.update_ratio", "3",
                                           "--model.init_args.decay_steps", "10")),
    # tangent warm-up over 6 steps: the stop at 3 has r_k = 0.5.
    "scd": ("scm", True, 8, 3, ("--model.init_args.tangent_warmup_steps", "6", "--model.init_args.decay_steps", "8")),
    # learning-rate warm-up over 5 steps: the stop at 3 is inside it.
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


def assert_equal(a: Any, b: Any, where: str) -> None:
    """Recursive exact equality of checkpoint sections (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("method", list(CASES))
def test_stop_and_resume_is_bit_exact(
    method: str, workers: int, toy_shards: Path, toy_teacher_run: Path, tmp_path: Path
) -> None:
    teacher = toy_teacher_run / "checkpoints" / "last.ckpt"
    _, _, total, stop, _ = CASES[method]
    straight = read_checkpoint(fit(method, toy_shards, teacher, tmp_path / "a", total, workers))
    stopped_path = fit(method, toy_shards, teacher, tmp_path / "b", stop, workers)
    stopped = read_checkpoint(stopped_path)
    assert stopped["global_step"] == stop
    state = stopped["state_dict"]
    if method == "tract":
        assert int(state["phase"]) == 1  # mid-phase: two steps after the phase change
    if method == "cd":
        assert int(state["num_scales_now"]) == 11  # before the curriculum doubles N
    if method == "fdistill":
        assert int(state["updates"]) % 3 != 0  # mid-cycle: the next step is a critic-only step
    resumed = read_checkpoint(fit(method, toy_shards, teacher, tmp_path / "b", total, workers, "--ckpt_path", "last"))
    assert straight["global_step"] == resumed["global_step"] == total
    if method == "cd":
        assert int(resumed["state_dict"]["num_scales_now"]) == 21  # the resumed run went through the doubling
    if method == "scd":
        assert any(k.startswith("weight_net.") for k in resumed["state_dict"])  # w_φ is saved and resumed
    for section in ("state_dict", "ema_state_dict", "optimizer_states", "lr_schedulers", "rng_states",
                    "ShardDataModule", "lit_gen"):  # fmt: skip
        assert (section in straight) == (section in resumed), section
        if section in straight:
            assert_equal(straight[section], resumed[section], section)
    # The run really moved: raw weights differ from the stopped checkpoint's.
    trained = [k for k in state if k.startswith("net.")]
    assert any(not torch.equal(state[k], resumed["state_dict"][k]) for k in trained)
