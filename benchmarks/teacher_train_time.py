"""Train a teacher recipe end to end on this machine and print a results row (wall time, s/step, grid path).

    python benchmarks/teacher_train_time.py --recipe recipes/digits/teacher.yaml --shards builtin:digits \
        --data-dir runs/data/digits --root runs/bench/digits_teacher

Runs `lit-gen shards` (if the folder is missing), `lit-gen fit` in a subprocess (so timings include start-up, as a
user sees them), then `lit-gen sample` to a PNG grid, and prints a markdown row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def run(*args: str) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "lit_gen.cli", *args], check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/digits/teacher.yaml")
    parser.add_argument("--shards", default="builtin:digits", help="source for lit-gen shards")
    parser.add_argument("--data-dir", default="runs/data/digits")
    parser.add_argument("--root", default="runs/bench/digits_teacher")
    parser.add_argument("--n", type=int, default=100, help="samples in the grid")
    parser.add_argument("--extra", nargs="*", default=[], help="extra fit overrides, e.g. --trainer.max_steps=100")
    args = parser.parse_args()

    if not Path(args.data_dir, "dataset.json").is_file():
        run("shards", args.shards, "--out", args.data_dir)
    ckpt = Path(args.root) / "checkpoints" / "last.ckpt"
    fit_s = run(
        "fit",
        "-c",
        args.recipe,
        f"--data.init_args.shards={args.data_dir}",
        f"--trainer.default_root_dir={args.root}",
        "--trainer.enable_progress_bar=false",
        *args.extra,
    )
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    grid = Path(args.root) / "samples_35nfe.png"
    sample_s = run("sample", "--ckpt", str(ckpt), "--n", str(args.n), "--steps", "18", "--out", str(grid))
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| recipe | steps | fit wall (s) | s/step | sample 35 NFE x n (s) | grid | machine |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.recipe} | {steps} | {fit_s:.0f} | {fit_s / max(steps, 1):.3f} | {sample_s:.1f} (n={args.n}) "
        f"| {grid} | {machine} |"
    )


if __name__ == "__main__":
    main()
