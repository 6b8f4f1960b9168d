"""The console: Lightning's expected messages filtered (with -v/--verbose back), an honest step progress bar."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lit_gen.console import quiet_known_noise, split_verbose
from tests.conftest import REPO

FILTERED = (
    "💡 Tip",
    "LeafSpec",
    "no last checkpoint available",
    "in eval mode at the start of training",
    "but have no `val_dataloader`",
    "smaller than the logging interval",
)


def test_verbose_flags_are_taken_out_before_a_double_dash_only() -> None:
    assert split_verbose(["fit", "-c", "r.yaml", "-v"]) == (["fit", "-c", "r.yaml"], True)
    assert split_verbose(["--verbose", "sample", "--ckpt", "x"]) == (["sample", "--ckpt", "x"], True)
    assert split_verbose(["slurm", "-c", "r.yaml", "--", "-v"]) == (["slurm", "-c", "r.yaml", "--", "-v"], False)


def test_known_warnings_are_filtered_and_real_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIT_GEN_VERBOSE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quiet_known_noise() is True
        warnings.warn("Found 351 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("The dataloader does not have many workers which may be a bottleneck.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers which may be a bottleneck."]

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]...")
        log.info("GPU available: False, used: False")
        quiet_known_noise(verbose=True)
        log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]...")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        monkeypatch.delenv("LIT_GEN_VERBOSE", raising=False)
        quiet_known_noise(verbose=False)
    assert records[0] == "GPU available: False, used: False" and records[1].startswith("💡 Tip") and len(records) == 2


def _fit(shards: Path, root: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    env.pop("LIT_GEN_VERBOSE", None)
    args = [sys.executable, "-m", "lit_gen.cli", "fit", "-c", str(REPO / "recipes/toy2d/teacher.yaml")]
    args += ["--data.init_args.shards", str(shards), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "24", "--ckpt_path", "last", *extra]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_fresh_fit_prints_no_known_noise_and_no_negative_epoch(toy_shards: Path, tmp_path: Path) -> None:
    out = _fit(toy_shards, tmp_path / "fresh")
    for line in FILTERED:
        assert line not in out, line
    assert "Epoch" not in out and "/-" not in out
    assert "24/24" in out and "train/loss: " in out and "samples/s: " in out  # step / max_steps, loss, throughput
    assert (tmp_path / "fresh" / "checkpoints" / "last.ckpt").is_file()  # --ckpt_path last on a fresh run: started

    verbose = _fit(toy_shards, tmp_path / "verbose", "--verbose")
    for line in ("💡 Tip", "LeafSpec", "but have no `val_dataloader`"):
        assert line in verbose, line
    assert "no last checkpoint available" not in verbose  # not filtered: a fresh run does not ask Lightning for one
