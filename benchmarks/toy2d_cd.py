"""Consistency-distil a toy2d teacher with recipes/toy2d/cd.yaml and score 1-, 2- and 3-step samples.

    python benchmarks/toy2d_cd.py [--mixture gmm5_heldout] [--n 8192] [--extra --trainer.max_steps=1000 ...]

Uses the teacher of `benchmarks/toy2d_teacher.py` (runs/bench/toy2d_teacher/<mixture>, its shards next to it),
runs `lit-gen fit -c recipes/toy2d/cd.yaml` in a subprocess (timed; the load average before/after is printed because
the wall time depends on it), then samples N points from the student with the consistency sampler on its own σ
points (`--steps K`, as `lit-gen sample` does) and from the teacher at 1, 2 and 35 NFE, scored with
`mixture_metrics` (mode-weight TV, off-mode mass beyond 3 sigma, modes covered). The issue's bar on the held-out
mixture: 1 step TV <= 0.15 and off-mode <= 15 %, 2 steps TV <= 0.08 and off-mode <= 10 %, all modes.
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

TEACHER_BUDGETS = [("euler", 1, 1), ("euler", 2, 2), ("heun", 18, 35)]  # (sampler, steps, NFE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--teacher-root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--root", default="runs/bench/toy2d_cd")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--skip-fit", action="store_true", help="score an existing run")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `lit-gen fit` arguments")
    args = parser.parse_args()
    teacher = Path(args.teacher_root) / args.mixture / "checkpoints" / "last.ckpt"
    shards = Path(args.teacher_root) / "data" / args.mixture
    mixture = TOY2D[args.mixture]
    root = Path(args.root) / args.mixture
    rows = []
    model = load_model(teacher)
    for sampler, steps, nfe in TEACHER_BUDGETS:
        metrics = mixture_metrics(model.sample(args.n, steps=steps, sampler=sampler, seed=1).numpy(), mixture)
        rows.append(("teacher", f"{sampler} {steps}", nfe, "", "", metrics))
    fit, load = "", ""
    if not args.skip_fit:
        load_before = os.getloadavg()[0]
        start = time.time()
        subprocess.run(
            [
                sys.executable, "-m", "lit_gen.cli", "fit", "-c", "recipes/toy2d/cd.yaml",
                f"--model.init_args.teacher={teacher}", f"--data.init_args.shards={shards}",
                f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *args.extra,
            ],
            check=True,
        )  # fmt: skip
        fit = f"{time.time() - start:.0f}"
        load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    student = load_model(root / "checkpoints" / "last.ckpt")
    for steps in (1, 2, 3):
        metrics = mixture_metrics(student.sample(args.n, steps=steps, seed=1).numpy(), mixture)
        rows.append(("CD student", f"consistency {steps}", steps, fit, load, metrics))
    print(f"mixture {args.mixture}, {args.n} samples; student σ points {student.description['sampling']['grid']}")
    print()
    print("| model | sampler | NFE | fit wall (s) | load avg (before / after) | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, sampler, nfe, fit_s, load_s, m in rows:
        print(
            f"| {name} | {sampler} | {nfe} | {fit_s} | {load_s} | {m['mode_tv']:.3f} | {100 * m['off_mode']:.1f} % | "
            f"{m['modes_covered']}/{m['num_modes']} |"
        )


if __name__ == "__main__":
    main()
