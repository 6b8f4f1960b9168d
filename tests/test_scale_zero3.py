"""DeepSpeed ZeRO-3 for the distillation methods (issue 20) on 2 CPU processes over gloo.

A toy2d teacher is trained under ZeRO-3 (its DeepSpeed folder is then every student's ``--model.init_args.teacher``);
TRACT (with a phase change, so the teacher is swapped for the inference EMA), CD (target EMA µ = 0.9) and f-distill
(three parameter groups, generator skipped on critic steps, generator EMA) each fit 6 steps uninterrupted, 3 + 3 with
a resume, and 6 under ZeRO-2. Expected: the resumed state (student, every EMA / target / self-teacher / teacher copy,
buffers) equals the uninterrupted one bit for bit, and the ZeRO-3 state equals the ZeRO-2 one within fp32 rounding.
``recipes/scale/deepspeed_cpu_stage3.yaml`` partitions every parameter (persistence threshold 0), so each copy really
is a partition. Marked multiprocess (they still run in CI); every run is a `lit-gen` subprocess (DS_ACCELERATOR=cpu
must be set before DeepSpeed is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gen.errors import LitGenError
from lit_gen.export import export, load_model, read_checkpoint, read_model_file
from tests.conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ZERO3 = ["-c", str(REPO / "recipes/scale/deepspeed_cpu_stage3.yaml")]
ZERO2 = ["-c", str(REPO / "recipes/scale/deepspeed_cpu.yaml")]
STEPS = 6
# Per method: overrides that make every copy move within 6 steps.
METHODS = {
    "tract": ["--model.init_args.steps_per_phase=[2, 4]"],  # phase change after step 2: teacher <- inference EMA
    "cd": ["--model.init_args.target_momentum=0.9"],  # the lerp branch of the target update
    "fdistill": ["--model.init_args.update_ratio=2", "--model.init_args.optimizer.init_args.betas=[0.9, 0.99]"],
}
COPIES = {"tract": ("net_ema.", "self_teacher.", "teacher_net."), "cd": ("target_net.",), "fdistill": ("net_ema.",)}


def lit_gen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_gen.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def fit(recipe: str, shards: Path, root: Path, steps: int, *extra: str) -> Path:
    lit_gen(
        "fit", "-c", str(REPO / f"recipes/toy2d/{recipe}.yaml"), f"--data.init_args.shards={shards}",
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=64", *extra,
    )  # fmt: skip
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def zero3_teacher(toy_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-step toy2d teacher trained under ZeRO-3: a stage-3 DeepSpeed folder used as the students' teacher."""
    root = tmp_path_factory.mktemp("zero3") / "teacher"
    return fit("teacher", toy_shards, root, 10, *ZERO3)


@pytest.fixture(scope="module")
def runs(toy_shards: Path, zero3_teacher: Path, tmp_path_factory: pytest.TempPathFactory):
    """``runs(method, kind)``: the last.ckpt folder of one run, made once per module. kinds: ``whole`` (6 steps,
    ZeRO-3), ``resumed`` (3 steps, then resumed to 6), ``zero2`` (6 steps, ZeRO-2), ``replicated`` (``resumed``
    with ``teacher_zero3: replicate``)."""
    base, made = tmp_path_factory.mktemp("zero3_runs"), {}

    def run(method: str, kind: str) -> Path:
        if (method, kind) not in made:
            root = base / f"{method}_{kind}"
            extra = [f"--model.init_args.teacher={zero3_teacher}", *METHODS[method]]
            if kind == "whole":
                last = fit(method, toy_shards, root, STEPS, *ZERO3, *extra)
            elif kind == "zero2":
                last = fit(method, toy_shards, root, STEPS, *ZERO2, *extra)
            else:
                extra += ["--model.init_args.teacher_zero3=replicate"] if kind == "replicated" else []
                fit(method, toy_shards, root, STEPS // 2, *ZERO3, *extra)
                last = fit(method, toy_shards, root, STEPS, *ZERO3, *extra, "--ckpt_path", "last")
            made[method, kind] = last
        return made[method, kind]

    return run


def state(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint(folder)
    assert checkpoint["global_step"] == STEPS
    return checkpoint["state_dict"]


@pytest.mark.parametrize("method", list(METHODS))
def test_zero3_fit_resume_is_bit_exact_and_exports(method: str, runs, zero3_teacher: Path, tmp_path: Path) -> None:
    whole_folder = runs(method, "whole")
    assert (whole_folder / "checkpoint" / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()  # a stage-3 folder
    whole, resumed = state(whole_folder), state(runs(method, "resumed"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

    # Every module-owned copy was really updated (a copy that read partition placeholders would keep the teacher).
    teacher = load_model(zero3_teacher, weights="ema").net.state_dict()
    for prefix in ("net.", *COPIES[method]):
        moved = [not torch.equal(whole[prefix + k], v) for k, v in teacher.items() if v.is_floating_point()]
        assert any(moved), f"{prefix} still holds the teacher's weights"

    # Export consolidates the partitions: raw weights = the student, the default weights = its EMA where it has one.
    raw_file = export(whole_folder, tmp_path / "raw.safetensors", weights="raw")
    _, raw = read_model_file(raw_file, "raw")
    assert raw and all(torch.equal(v, whole[f"net.{k}"]) for k, v in raw.items())
    if method in ("tract", "fdistill"):
        description, ema = read_model_file(export(whole_folder, tmp_path / "ema.safetensors"))
        assert description["weights"] == "ema" and all(torch.equal(v, whole[f"net_ema.{k}"]) for k, v in ema.items())
    assert torch.isfinite(load_model(raw_file).sample(16)).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_zero3_equals_zero2_within_fp32_rounding(method: str, runs) -> None:
    """Measured: TRACT and CD bit-identical; f-distill within 3e-6 (its gradient clipping is active, and the global
    norm sums over other partitions). A generator wrongly stepped on a critic step moves it by ~1e-3 (lr 1e-3,
    momentum 0.9): 100x the tolerance."""
    zero3, zero2 = state(runs(method, "whole")), state(runs(method, "zero2"))
    assert zero3.keys() == zero2.keys()
    for key, value in zero3.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, zero2[key], rtol=1e-5, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, zero2[key]), key


def test_replicated_teacher_equals_partitioned_and_resumes(runs) -> None:
    """TRACT with ``teacher_zero3: replicate`` (the teacher outside ZeRO-3's partitioning, saved in rank 0's client
    state, broadcast on resume; swapped at the phase change) = the partitioned teacher's uninterrupted run."""
    folder = runs("tract", "replicated")
    assert read_checkpoint(folder)["lit_gen"]["teacher_zero3"] == "replicate"
    replicated, partitioned = state(folder), state(runs("tract", "whole"))
    assert replicated.keys() == partitioned.keys()
    for key in partitioned:
        assert torch.equal(replicated[key], partitioned[key]), key


def test_stage3_folder_is_a_teacher(runs) -> None:
    """A stage-3 student folder as ``model.teacher``: its inference EMA (frozen partitions, consolidated)."""
    from lit_gen.methods.distill import DistillationMethod

    folder = runs("tract", "whole")
    whole = state(folder)
    student = DistillationMethod(teacher=str(folder))
    for key, value in student.teacher_net.state_dict().items():
        assert torch.equal(value, whole[f"net_ema.{key}"]), key


def test_zero3_refused_with_one_line_for_scm(toy_shards: Path, zero3_teacher: Path, tmp_path: Path) -> None:
    args = [
        "fit", "-c", str(REPO / "recipes/toy2d/scm.yaml"), *ZERO3, f"--data.init_args.shards={toy_shards}",
        f"--model.init_args.teacher={zero3_teacher}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    proc = lit_gen(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and all("the scm method does not support DeepSpeed ZeRO stage 3" in e for e in errors), errors
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_teacher_zero3_bad_value_is_one_line(zero3_teacher: Path) -> None:
    from lit_gen.methods.tract import TRACT

    with pytest.raises(LitGenError) as info:
        TRACT(teacher=str(zero3_teacher), teacher_zero3="shard")
    assert str(info.value) == "unknown teacher_zero3 'shard'; choose one of: partition, replicate"
