"""Helpers of the tests that run `lit-gen` as subprocesses (DeepSpeed and FSDP on 2 CPU processes) and of the
tests that hand lit_gen a hostile pickle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def run_lit_gen(
    *args: str, env: dict[str, str] | None = None, expect: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m lit_gen.cli ARGS` from the repository root with one OpenMP thread (plus ``env``); asserts its exit
    status is ``expect`` and shows the end of its stderr otherwise."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_gen.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def toy_teacher_fit(shards: Path, root: Path, steps: int, *extra: str) -> list[str]:
    """The arguments of `lit-gen fit` of the real toy2d teacher recipe (batch 256, no progress bar)."""
    return [
        "fit", "-c", str(REPO / "recipes/toy2d/teacher.yaml"), f"--data.init_args.shards={shards}",
        f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=256", *extra,
    ]  # fmt: skip


class TouchExploit:
    """A pickle payload that would run `touch MARKER` when unpickled: a loader that runs code leaves the file."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))
