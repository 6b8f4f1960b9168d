"""Is it faster to run a pipeline's independent fit stages side by side (``lit-gen pipeline --jobs N``)?

Runs the same short ``lit-gen fit`` (default: the digits TRACT recipe from a quickstart's teacher, 100 steps) three
ways, one after the other in one run, and prints a table: one process with every core, one process with one thread,
and one process per core with one thread each, all at once. "steps/s" counts every process's steps; the wall includes
each process's start-up (imports, loading the teacher), as a pipeline stage's does.

    python benchmarks/pipeline_jobs.py --quickstart runs/quickstart [--steps 100] [--recipe R] [--key value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lit_gen.pipeline import cpu_count

REPO = Path(__file__).resolve().parents[1]


def fit_command(args: argparse.Namespace, out: Path) -> list[str]:
    quickstart = Path(args.quickstart)
    return [
        sys.executable, "-m", "lit_gen.cli", "fit", "-c", str(args.recipe),
        "--trainer.default_root_dir", str(out),
        "--data.init_args.shards", str(quickstart / "data" / "train"),
        "--model.init_args.teacher", str(quickstart / "teacher" / "checkpoints" / "last.ckpt"),
        "--trainer.max_steps", str(args.steps),
        "--trainer.enable_progress_bar", "false",
        *args.extra,
    ]  # fmt: skip


def run_side_by_side(args: argparse.Namespace, root: Path, name: str, procs: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    running = []
    for k in range(procs):
        log = (root / f"{name}_{k}.log").open("w")
        running.append(subprocess.Popen(fit_command(args, root / f"{name}_{k}"), stdout=log, stderr=log, env=env))
    for proc in running:
        if proc.wait() != 0:
            raise SystemExit(f"{name}: a fit failed; see {root}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", default="runs/quickstart", help="a finished quickstart folder (data, teacher)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "digits" / "tract.yaml"))
    parser.add_argument("--steps", type=int, default=100)
    args, args.extra = parser.parse_known_args()  # anything else: --key value overrides for the fit
    if args.recipe.endswith("tract.yaml") and not args.extra:
        args.extra = ["--model.init_args.steps_per_phase", f"[{args.steps // 5}, {args.steps - args.steps // 5}]"]
    cores = cpu_count()
    root = Path(tempfile.mkdtemp(prefix="pipeline_jobs_"))
    rows = []
    try:
        for name, procs, threads in (
            (f"1 process, {cores} threads", 1, cores),
            ("1 process, 1 thread", 1, 1),
            (f"{cores} processes, 1 thread each", cores, 1),
        ):
            wall = run_side_by_side(args, root, name.split(",")[0].replace(" ", "_") + f"_{threads}", procs, threads)
            rows.append((name, procs * args.steps, wall))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0][1] / rows[0][2]
    print(f"{args.recipe}, {args.steps} steps per process, {cores} cores (start-up included)\n")
    print("| run | steps | wall (s) | steps/s | throughput vs one process on every core |")
    print("| --- | --- | --- | --- | --- |")
    for name, steps, wall in rows:
        print(f"| {name} | {steps} | {wall:.1f} | {steps / wall:.3f} | {steps / wall / base:.2f}x |")


if __name__ == "__main__":
    main()
