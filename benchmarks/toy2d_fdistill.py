"""f-distill one-step students of the toy2d teachers: mode metrics per divergence, with and without the GAN head.

    python benchmarks/toy2d_fdistill.py [--mixture gmm5_heldout] [--divergences js rkl] [--gan 0.01 0]
        [--n 8192] [--seeds 0] [-- EXTRA lit-gen fit ARGS]

For each (divergence, λ_GAN, seed): `lit-gen fit -c recipes/toy2d/fdistill.yaml` (timed, in a subprocess) from the
mixture's teacher (made by `benchmarks/toy2d_teacher.py`: <root>/<mixture>/checkpoints/last.ckpt, shards
<root>/data/<mixture>), then N one-step samples scored against the mixture's true modes (mode-weight TV, off-mode
mass beyond 3 σ of every mode — true samples have 1.1 % there — and modes covered). The teacher's own 35-NFE and
1-NFE rows come first for reference. Prints a markdown table.
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


def row(label: str, fit_s: str, nfe: int, m: dict) -> str:
    return (
        f"| {label} | {fit_s} | {nfe} | {m['mode_tv']:.3f} | {100 * m['off_mode']:.1f} % | "
        f"{m['modes_covered']}/{m['num_modes']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--divergences", nargs="+", default=["js", "rkl"])
    parser.add_argument("--gan", nargs="+", type=float, default=[0.01], help="λ_GAN values")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recipe", default="recipes/toy2d/fdistill.yaml")
    parser.add_argument("--teacher-root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--out", default="runs/bench/toy2d_fdistill")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--skip-existing", action="store_true", help="reuse a run whose last.ckpt exists")
    parser.add_argument("extra", nargs="*", help="more `lit-gen fit` arguments (after --)")
    args = parser.parse_args()
    teacher_root = Path(args.teacher_root)
    teacher = teacher_root / args.mixture / "checkpoints" / "last.ckpt"
    shards = teacher_root / "data" / args.mixture
    if not teacher.is_file():
        sys.exit(f"no teacher at {teacher}: run benchmarks/toy2d_teacher.py --mixtures {args.mixture} first")
    spec = TOY2D[args.mixture]
    rows = []
    model = load_model(teacher)
    for sampler, steps, nfe in (("heun", 18, 35), ("euler", 1, 1)):
        m = mixture_metrics(model.sample(args.n, steps=steps, sampler=sampler, seed=1).numpy(), spec)
        rows.append(row(f"teacher ({sampler} {steps})", "-", nfe, m))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for divergence in args.divergences:
        for gan in args.gan:
            for seed in args.seeds:
                root = Path(args.out) / args.mixture / f"{divergence}_gan{gan:g}_seed{seed}"
                command = [
                    sys.executable, "-m", "lit_gen.cli", "fit", "-c", args.recipe,
                    f"--model.init_args.teacher={teacher}", f"--data.init_args.shards={shards}",
                    f"--model.init_args.divergence={divergence}", f"--model.init_args.gan_weight={gan}",
                    f"--seed_everything={seed}", f"--trainer.default_root_dir={root}",
                    "--trainer.enable_progress_bar=false", *args.extra,
                ]  # fmt: skip
                if args.skip_existing and (root / "checkpoints" / "last.ckpt").is_file():
                    fit_s = "(earlier run)"
                else:
                    start = time.time()
                    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
                    fit_s = f"{time.time() - start:.0f}"
                student = load_model(root / "checkpoints" / "last.ckpt")
                m = mixture_metrics(student.sample(args.n, seed=1).numpy(), spec)
                label = f"{divergence}, λ_GAN={gan:g}, seed {seed}"
                rows.append(row(label, fit_s, 1, m))
                print(rows[-1], flush=True)
    print(f"\n{args.mixture}: {args.n} samples, seed 1 for sampling; extra fit args: {' '.join(args.extra) or '-'}")
    print("| model | fit wall (s) | NFE | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
