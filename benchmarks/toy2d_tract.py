"""Distil a toy2d teacher with the TRACT and BTD recipes and score 1-step samples against the true mixture.

    python benchmarks/toy2d_tract.py [--mixture gmm5_heldout] [--n 8192] [--seeds 0 1 2] [--sample-seeds 1 2 3]

Uses the teacher of `benchmarks/toy2d_teacher.py` (runs/bench/toy2d_teacher/<mixture>, its shards next to it),
runs `lit-gen fit -c recipes/toy2d/{tract,btd}.yaml` in a subprocess (timed; the load average is printed because the
wall time depends on it), then samples N points from each student with its own 1-step grid and from the teacher at
1, 2 and 35 NFE, scored with `mixture_metrics` (mode-weight TV, off-mode mass beyond 3 sigma, modes covered).

`--seeds`: one fit per training seed (`--seed_everything` and the stream seed; seed 0 is the recipe as shipped, in
ROOT/<mixture>/<method>, other seeds in .../<method>_seed<k>; an existing last.ckpt is reused with `--reuse`).
`--sample-seeds`: each model is scored on several independent sample draws; the table gives the mean and the
spread (min-max) over draws, so that a difference between methods can be told from the metric's own noise (with
8192 samples the mode-weight TV of a perfect sampler is already ~0.01). A last table aggregates over training seeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sample-seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--reuse", action="store_true", help="score an existing last.ckpt instead of fitting again")
    args = parser.parse_args()
    teacher = Path(args.teacher_root) / args.mixture / "checkpoints" / "last.ckpt"
    shards = Path(args.teacher_root) / "data" / args.mixture
    mixture = TOY2D[args.mixture]
    rows = []

    def score(model, **kwargs) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
        draws = [mixture_metrics(model.sample(args.n, seed=s, **kwargs).numpy(), mixture) for s in args.sample_seeds]
        return {key: [float(d[key]) for d in draws] for key in ("mode_tv", "off_mode", "modes_covered", "num_modes")}

    model = load_model(teacher)
    for sampler, steps, nfe in TEACHER_BUDGETS:
        rows.append(("teacher", "", f"{sampler} {steps}", nfe, "", "", score(model, steps=steps, sampler=sampler)))
    for method in args.methods:
        for seed in args.seeds:
            root = Path(args.root) / args.mixture / (method.lower() + (f"_seed{seed}" if seed else ""))
            fit, load = "", ""
            if not (args.reuse and (root / "checkpoints" / "last.ckpt").exists()):
                load_before = os.getloadavg()[0]
                start = time.time()
                subprocess.run(
                    [
                        sys.executable, "-m", "lit_gen.cli", "fit", "-c", RECIPES[method],
                        f"--model.init_args.teacher={teacher}", f"--data.init_args.shards={shards}",
                        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                        f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                    ],
                    check=True,
                )  # fmt: skip
                fit = f"{time.time() - start:.0f}"
                load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
            student = load_model(root / "checkpoints" / "last.ckpt")
            rows.append((method, seed, "own grid, 1 step", 1, fit, load, score(student, steps=1)))

    def spread(values: list[float], scale: float = 1.0, fmt: str = ".3f") -> str:
        mean = statistics.fmean(values) * scale
        if len(values) == 1:
            return f"{mean:{fmt}}"
        return f"{mean:{fmt}} ({min(values) * scale:{fmt}}–{max(values) * scale:{fmt}})"

    print(f"mixture {args.mixture}, {args.n} samples per draw, sample seeds {args.sample_seeds}")
    print("| model | train seed | sampler | NFE | fit wall (s) | load avg start / end | mode TV | off-mode % | "
          "modes covered (min) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seed, sampler, nfe, fit, load, m in rows:
        print(
            f"| {name} | {seed} | {sampler} | {nfe} | {fit} | {load} | {spread(m['mode_tv'])} | "
            f"{spread(m['off_mode'], 100, '.1f')} | {min(m['modes_covered']):.0f}/{m['num_modes'][0]:.0f} |"
        )
    if len(args.seeds) > 1:
        print("\nOver training seeds (each seed's mean over sample draws; mean, min–max):")
        print("| model | seeds | mode TV | off-mode % |")
        print("| --- | --- | --- | --- |")
        for method in args.methods:
            per_seed = [m for name, _, _, _, _, _, m in rows if name == method]
            tv = [statistics.fmean(m["mode_tv"]) for m in per_seed]
            off = [statistics.fmean(m["off_mode"]) for m in per_seed]
            print(f"| {method} | {len(per_seed)} | {spread(tv)} | {spread(off, 100, '.1f')} |")


if __name__ == "__main__":
    main()
