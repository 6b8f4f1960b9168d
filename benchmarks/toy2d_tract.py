"""Distil a toy2d teacher with the TRACT and BTD recipes and score 1-step samples against the true mixture.

    python benchmarks/toy2d_tract.py [--mixture gmm5_heldout] [--n 8192]

Uses the teacher of `benchmarks/toy2d_teacher.py` (runs/bench/toy2d_teacher/<mixture>, its shards next to it),
runs `lit-gen fit -c recipes/toy2d/{tract,btd}.yaml` in a subprocess (timed; the load average is printed because the
wall time depends on it), then samples N points from each student with its own 1-step grid and from the teacher at
1, 2 and 35 NFE, scored with `mixture_metrics` (mode-weight TV, off-mode mass beyond 3 sigma, modes covered).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.export import load_model

RECIPES = {"TRACT": "recipes/toy2d/tract.yaml", "BTD": "recipes/toy2d/btd.yaml"}
TEACHER_BUDGETS = [("euler", 1, 1), ("euler", 2, 2), ("heun", 18, 35)]  # (sampler, steps, NFE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--teacher-root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--root", default="runs/bench/toy2d_tract")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES))
    parser.add_argument("--n", type=int, default=8192)
    args = parser.parse_args()
    teacher = Path(args.teacher_root) / args.mixture / "checkpoints" / "last.ckpt"
    shards = Path(args.teacher_root) / "data" / args.mixture
    mixture = TOY2D[args.mixture]
    rows = []
    model = load_model(teacher)
    for sampler, steps, nfe in TEACHER_BUDGETS:
        metrics = mixture_metrics(model.sample(args.n, steps=steps, sampler=sampler, seed=1).numpy(), mixture)
        rows.append(("teacher", f"{sampler} {steps}", nfe, "", "", metrics))
    for method in args.methods:
        root = Path(args.root) / args.mixture / method.lower()
        load_before = os.getloadavg()[0]
        start = time.time()
        subprocess.run(
            [
                sys.executable, "-m", "lit_gen.cli", "fit", "-c", RECIPES[method],
                f"--model.init_args.teacher={teacher}", f"--data.init_args.shards={shards}",
                f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            ],
            check=True,
        )  # fmt: skip
        fit = f"{time.time() - start:.0f}"
        load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
        student = load_model(root / "checkpoints" / "last.ckpt")
        metrics = mixture_metrics(student.sample(args.n, steps=1, seed=1).numpy(), mixture)
        rows.append((method, "own grid, 1 step", 1, fit, load, metrics))
    print(f"mixture {args.mixture}, {args.n} samples")
    print("| model | sampler | NFE | fit wall (s) | load avg start / end | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, sampler, nfe, fit, load, m in rows:
        print(
            f"| {name} | {sampler} | {nfe} | {fit} | {load} | {m['mode_tv']:.3f} | {100 * m['off_mode']:.1f} % "
            f"| {m['modes_covered']}/{m['num_modes']} |"
        )


if __name__ == "__main__":
    main()
