"""Bit-exact resume from the CLI (issue 9 done-when): with the toy2d teacher recipe, a clean stop + `--ckpt_path last`
and a `kill -9` at an arbitrary moment + `--ckpt_path last` both end with exported weights (raw and EMA) identical to
the uninterrupted 600-step run (the session's `toy_teacher_run`)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_gen.export import read_checkpoint, read_model_file
from tests.conftest import REPO, fit_toy_teacher

pytestmark = pytest.mark.slow


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca["global_step"] == cb["global_step"] == 600
    for weights in ("raw", "ema"):
        (_, wa), (_, wb) = read_model_file(a, weights), read_model_file(b, weights)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{weights} {key} differs"
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for index in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[index][name], sb[index][name])


def test_clean_stop_and_resume_is_bit_exact(toy_teacher_run: Path, toy_shards: Path, tmp_path: Path) -> None:
    fit_toy_teacher(toy_shards, tmp_path, 250, "--model.init_args.decay_steps", 600)
    fit_toy_teacher(toy_shards, tmp_path, 600, "--model.init_args.decay_steps", 600, "--ckpt_path", "last")
    assert_same_run(toy_teacher_run / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.ckpt")


def test_kill_9_and_resume_is_bit_exact(toy_teacher_run: Path, toy_shards: Path, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "lit_gen.cli", "fit", "-c", str(REPO / "recipes/toy2d/teacher.yaml"),
        f"--data.init_args.shards={toy_shards}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=600",
        "--model.init_args.decay_steps=600", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 3.0))  # an arbitrary moment, possibly inside a save
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    step = read_checkpoint(last)["global_step"]  # a complete checkpoint, never a torn one
    assert 100 <= step < 600 and step % 100 == 0
    fit_toy_teacher(toy_shards, tmp_path, 600, "--model.init_args.decay_steps", 600, "--ckpt_path", "last")
    assert_same_run(toy_teacher_run / "checkpoints" / "last.ckpt", last)
