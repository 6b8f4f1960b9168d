"""Bad checkpoints, teachers and recipes fail before any work, with one line naming the file and the mismatch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod
from tests.conftest import REPO


class _RunsCode:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch PWNED",))


def lit_gen_error(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lit_gen.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lit-gen: error:")]
    assert len(lines) >= 1 and "Traceback" not in proc.stderr
    return lines[0]


def test_malicious_teacher_is_refused_and_runs_nothing(toy_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "teacher.ckpt"
    with open(bad, "wb") as handle:
        pickle.dump({"state_dict": {}, "lit_gen": _RunsCode()}, handle)
    args = ["fit", "-c", str(REPO / "recipes/toy2d/tract.yaml"), f"--data.init_args.shards={toy_shards}",
            f"--model.init_args.teacher={bad}", f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    line = lit_gen_error(tmp_path, *args)
    assert "refusing to load" in line and str(bad) in line
    assert not (tmp_path / "PWNED").exists()


def test_teacher_mismatches_name_file_and_mismatch(toy_teacher_run: Path, tmp_path: Path) -> None:
    teacher = toy_teacher_run / "checkpoints" / "last.ckpt"
    digits = tmp_path / "digits"
    from lit_gen.data.shards import write_shards

    write_shards("builtin:digits", digits)
    args = ["fit", "-c", str(REPO / "recipes/toy2d/tract.yaml"), f"--data.init_args.shards={digits}",
            f"--model.init_args.teacher={teacher}", f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    line = lit_gen_error(tmp_path, *args)
    assert str(teacher) in line and "shape [2]" in line and "[1, 8, 8]" in line
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(teacher.read_bytes()[:5000])
    args[-2] = f"--model.init_args.teacher={truncated}"
    line = lit_gen_error(tmp_path, *args)
    assert str(truncated) in line and "truncated" in line


def test_zero3_with_a_distillation_method_is_refused_before_work(toy_teacher_run: Path) -> None:
    method = DistillationMethod(teacher=str(toy_teacher_run / "checkpoints" / "last.ckpt"))
    method._trainer = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True), datamodule=None)  # type: ignore
    with pytest.raises(LitGenError, match="does not support DeepSpeed ZeRO stage 3"):
        method.setup("fit")


def test_global_batch_that_does_not_divide_across_devices_fails_before_launch(toy_shards: Path, tmp_path: Path) -> None:
    args = ["fit", "-c", str(REPO / "recipes/toy2d/teacher.yaml"), f"--data.init_args.shards={toy_shards}",
            "--data.init_args.global_batch_size=100", "--trainer.devices=3", "--trainer.strategy=ddp",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    line = lit_gen_error(tmp_path, *args)
    assert "global_batch_size 100 does not divide across 3 device(s)" in line and "multiple of 3" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_global_batch_is_split_over_devices_and_accumulation(toy_shards: Path) -> None:
    from lit_gen.data.datamodule import ShardDataModule

    dm = ShardDataModule(str(toy_shards), global_batch_size=96)
    assert dm.resolve_batch_size(4, 2) == 12 and dm.batch_size == dm.val_batch_size == 12
    assert ShardDataModule(str(toy_shards), batch_size=7).resolve_batch_size(8) == 7  # per-device size kept
    with pytest.raises(LitGenError, match="use a multiple of 8 \\(e.g. 96 or 104\\)"):
        ShardDataModule(str(toy_shards), global_batch_size=100).resolve_batch_size(8)
