"""Train the toy2d teacher recipe on several built-in 2-D mixtures and print mode metrics of its samples.

    python benchmarks/toy2d_teacher.py [--mixtures gmm8 gmm5_heldout grid9] [--n 8192]

For each mixture: `lit-gen shards builtin:toy2d:<name>` (training data drawn with seed 0), `lit-gen fit -c
recipes/toy2d/teacher.yaml` (timed, in a subprocess), then N samples at 35 NFE (Heun, 18 steps) and at a few
smaller budgets, scored against the mixture's true modes (mode-weight TV, off-mode mass beyond 3 sigma, modes covered).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.export import load_model

BUDGETS = [("heun", 18, 35), ("heun", 4, 7), ("euler", 8, 8), ("euler", 2, 2)]  # (sampler, steps, NFE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", nargs="+", default=["gmm8", "gmm5_heldout", "grid9"])
    parser.add_argument("--recipe", default="recipes/toy2d/teacher.yaml")
    parser.add_argument("--root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--n", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    for name in args.mixtures:
        data, root = Path(args.root) / "data" / name, Path(args.root) / name
        subprocess.run(
            [sys.executable, "-m", "lit_gen.cli", "shards", f"builtin:toy2d:{name}", "--out", str(data)], check=True
        )
        start = time.time()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lit_gen.cli",
                "fit",
                "-c",
                args.recipe,
                f"--data.init_args.shards={data}",
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
            ],
            check=True,
        )
        fit_s = time.time() - start
        model = load_model(root / "checkpoints" / "last.ckpt")
        for sampler, steps, nfe in BUDGETS:
            points = model.sample(args.n, steps=steps, sampler=sampler, seed=1).numpy()
            m = mixture_metrics(points, TOY2D[name])
            rows.append((name, fit_s, f"{sampler} {steps}", nfe, m))
    print("| mixture | fit wall (s) | sampler | NFE | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, fit_s, sampler, nfe, m in rows:
        print(
            f"| {name} | {fit_s:.0f} | {sampler} | {nfe} | {m['mode_tv']:.3f} | {100 * m['off_mode']:.1f} % "
            f"| {m['modes_covered']}/{m['num_modes']} |"
        )


if __name__ == "__main__":
    main()
