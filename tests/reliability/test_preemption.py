"""SIGUSR1 / SIGTERM during `lit-gen fit` -> a checkpoint at the current step and a clean exit saying how to resume;
the resumed run continues from that step. Run in a subprocess with timeouts (Lightning #21406: a hanging save)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_gen.export import read_checkpoint
from tests.conftest import REPO, run_cli


def fit_command(shards: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lit_gen.cli", "fit", "-c", str(REPO / "recipes/toy2d/teacher.yaml"),
        f"--data.init_args.shards={shards}", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={max_steps}",
        "--trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_signal_saves_current_step_and_exits_cleanly(signame: str, toy_shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen(
        fit_command(toy_shards, tmp_path, 100000), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the first checkpoint (step 100) shows training is running
    assert last.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    time.sleep(1.0)
    proc.send_signal(getattr(signal, signame))
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"lit-gen fit did not stop within 60 s of {signame}")
    err = err.decode()
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {signame} at step" in err
    step = int(err.split(f"stopped by {signame} at step ")[1].split()[0])
    saved = read_checkpoint(last)
    assert saved["global_step"] == step and 100 <= step < 100000
    run_cli(*fit_command(toy_shards, tmp_path, step + 5)[3:], "--ckpt_path", "last")
    assert read_checkpoint(last)["global_step"] == step + 5
