"""One toy 2-D quality table for every method (issue 8): teacher NFE rows, TRACT, BTD, CD and f-distill per divergence.

    python benchmarks/toy2d_table.py [--mixture gmm5_heldout] [--n 8192]

Scores students already trained by the per-method benchmarks on the same teacher (`runs/bench/toy2d_teacher/<mixture>`):
`benchmarks/toy2d_tract.py` (TRACT and BTD), `benchmarks/toy2d_cd.py` (CD; its 1500-step recipe run) and
`benchmarks/toy2d_fdistill.py` (one run per divergence and λ_GAN). Every row draws N samples with seed 1 and is scored
by `lit_gen.eval.Evaluator` against the mixture's shards: Fréchet distance in raw 2-D data units (reference: the
first 50000 training points) and the exact mixture metrics (mode-weight TV, off-mode mass beyond 3 σ of every mode —
true samples have 1.1 % there —, modes covered). Missing runs are listed, not trained.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from lit_gen.data.builtin import TOY2D
from lit_gen.eval import Evaluator
from lit_gen.export import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--bench", default="runs/bench")
    args = parser.parse_args()
    bench, mix = Path(args.bench), args.mixture
    teacher = bench / "toy2d_teacher" / mix / "checkpoints" / "last.ckpt"
    rows: list[tuple[str, Path, int | None, str | None, int]] = [
        ("teacher", teacher, 18, "heun", 35),
        ("teacher", teacher, 8, "euler", 8),
        ("teacher", teacher, 2, "euler", 2),
        ("teacher", teacher, 1, "euler", 1),
        ("TRACT (64 -> 8 -> 1)", bench / "toy2d_tract" / mix / "tract" / "checkpoints" / "last.ckpt", 1, None, 1),
        ("BTD (64 -> 32 -> ... -> 1)", bench / "toy2d_tract" / mix / "btd" / "checkpoints" / "last.ckpt", 1, None, 1),
    ]
    cd = bench / "toy2d_cd1500" / mix / "checkpoints" / "last.ckpt"
    rows += [("CD", cd, 1, None, 1), ("CD", cd, 2, None, 2)]
    for divergence in ("rkl", "softened_rkl", "js", "hellinger", "fkl", "jeffreys"):
        for gan in ("0.01", "0"):
            run = bench / "toy2d_fdistill" / mix / f"{divergence}_gan{gan}_seed0" / "checkpoints" / "last.ckpt"
            if gan == "0" and not run.exists():
                continue  # runs without the GAN head are optional rows
            rows.append((f"f-distill {divergence}, λ_GAN={gan}", run, 1, None, 1))
    evaluator = Evaluator(bench / "toy2d_teacher" / "data" / mix, ["fd", "mixture"])
    num_modes = TOY2D[mix].num_modes
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {mix}, {args.n} samples, seed 1\n")
    print("| model | sampler | steps | NFE | FD (raw) | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    missing = []
    for name, ckpt, steps, sampler, nfe in rows:
        if not ckpt.exists():
            missing.append(f"{name}: {ckpt}")
            continue
        model = load_model(ckpt)
        with torch.no_grad():
            samples = model.sample(args.n, steps=steps, sampler=sampler, seed=1)
        m = evaluator.score(samples)
        used = sampler or model.description.get("sampling", {}).get("sampler", "own")
        print(f"| {name} | {used} | {steps or '-'} | {nfe} | {m['fd']:.4f} | {m['mode_tv']:.3f} | "
              f"{100 * m['off_mode']:.1f} % | {int(m['modes_covered'])}/{num_modes} |", flush=True)  # fmt: skip
    for line in missing:
        print(f"missing: {line}")


if __name__ == "__main__":
    main()
