"""Do the f-distill one-step students cover every mode? Built-in and newly generated 2-D mixtures, every divergence.

    OMP_NUM_THREADS=1 python benchmarks/toy2d_mode_coverage.py [--mixtures gmm5_heldout rand7:1 rand4:2 ...]
        [--divergences rkl js fkl hellinger jeffreys] [--teacher-steps 1200] [--steps 1200] [--n 8192]
        [--seeds 0 1 2] [--skip-existing]

A mixture is a built-in name (``TOY2D``) or ``randK:SEED``: K isotropic modes generated here with other layouts than the
built-ins — unequal Dirichlet(1) weights (the smallest at least 3 %), widths 0.08–0.35, centres uniform in a disc of
radius 4 at least 1.4 apart (the seed decides all of it; never used to tune a recipe). For each mixture: 40000
points -> `lit-gen shards`, the toy2d EDM teacher recipe (``--teacher-steps``), then
`lit-gen fit -c recipes/toy2d/fdistill.yaml` per divergence (``--steps``, lr decayed to 0 at the end), and 8192
one-step samples scored against the true modes:
mode-weight TV, off-mode mass (beyond 3 σ of every mode; true samples 1.1 %), modes covered. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lit_gen.data.builtin import TOY2D, Mixture2D, mixture_metrics
from lit_gen.export import load_model


def random_mixture(k: int, seed: int) -> Mixture2D:
    """K modes: Dirichlet(1) weights (min 3 %), widths U[0.08, 0.35], centres in a radius-4 disc ≥ 1.4 apart."""
    rng = np.random.default_rng(1000 + seed)
    while True:
        weights = rng.dirichlet(np.ones(k))
        if weights.min() >= 0.03:
            break
    centres: list[tuple[float, float]] = []
    while len(centres) < k:
        r, a = 4.0 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        c = (float(r * np.cos(a)), float(r * np.sin(a)))
        if all(np.hypot(c[0] - x, c[1] - y) >= 1.4 for x, y in centres):
            centres.append(c)
    stds = tuple(float(s) for s in rng.uniform(0.08, 0.35, size=k))
    return Mixture2D(means=tuple(centres), stds=stds, weights=tuple(float(w) for w in weights / weights.sum()))


def mixture(name: str) -> Mixture2D:
    if name in TOY2D:
        return TOY2D[name]
    if name.startswith("rand") and ":" in name:
        k, seed = name[4:].split(":")
        return random_mixture(int(k), int(seed))
    sys.exit(f"unknown mixture {name!r}: a TOY2D name or randK:SEED")


def cli(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "lit_gen.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", nargs="+", default=["gmm5_heldout", "rand7:1", "rand4:2"])
    parser.add_argument("--divergences", nargs="+", default=["rkl", "js", "fkl", "hellinger", "jeffreys"])
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--root", default="runs/bench/mode_coverage")
    parser.add_argument("--skip-existing", action="store_true")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="student training seeds (seed_everything); one teacher per mixture serves them all",
    )
    parser.add_argument("extra", nargs="*", help="more `lit-gen fit` arguments for the students (after --)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results = []
    for name in args.mixtures:
        spec = mixture(name)
        root = Path(args.root) / name.replace(":", "_")
        data = root / "data"
        if not (data / "dataset.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            points, _ = spec.sample(40000, seed=0)
            np.save(root / "points.npy", points.astype(np.float32))
            cli("shards", str(root / "points.npy"), "--out", str(data), env=env)
        teacher = root / "teacher" / "checkpoints" / "last.ckpt"
        if not (args.skip_existing and teacher.is_file()):
            cli("fit", "-c", "recipes/toy2d/teacher.yaml", f"--data.init_args.shards={data}",
                f"--trainer.default_root_dir={root / 'teacher'}", f"--trainer.max_steps={args.teacher_steps}",
                f"--model.init_args.decay_steps={args.teacher_steps}", "--trainer.enable_progress_bar=false",
                env=env)  # fmt: skip
        model = load_model(teacher)
        rows = [("teacher (heun 18, 35 NFE)", mixture_metrics(model.sample(args.n, steps=18, seed=1).numpy(), spec))]
        for divergence, seed in ((d, s) for d in args.divergences for s in args.seeds):
            out = root / (f"fdistill_{divergence}" + (f"_s{seed}" if seed else ""))
            start = time.time()
            if not (args.skip_existing and (out / "checkpoints" / "last.ckpt").is_file()):
                cli("fit", "-c", "recipes/toy2d/fdistill.yaml", f"--model.init_args.teacher={teacher}",
                    f"--data.init_args.shards={data}", f"--model.init_args.divergence={divergence}",
                    f"--trainer.max_steps={args.steps}", f"--model.init_args.decay_steps={args.steps}",
                    f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
                    f"--seed_everything={seed}", *args.extra,
                    env=env)  # fmt: skip
            student = load_model(out / "checkpoints" / "last.ckpt")
            m = mixture_metrics(student.sample(args.n, seed=1).numpy(), spec)
            rows.append((f"f-distill {divergence} seed {seed} (1 NFE, {time.time() - start:.0f} s)", m))
            print(name, rows[-1][0], {k: m[k] for k in ("mode_tv", "off_mode", "modes_covered", "num_modes")},
                  flush=True)  # fmt: skip
        results.append((name, spec, rows))
    for name, spec, rows in results:
        weights = ", ".join(f"{w:.2f}" for w in spec.weights)
        print(f"\n{name}: {spec.num_modes} modes, weights {weights}; {args.n} samples (seed 1)")
        print("| model | mode TV | off-mode | modes covered |\n| --- | --- | --- | --- |")
        for label, m in rows:
            covered = f"{m['modes_covered']}/{m['num_modes']}"
            print(f"| {label} | {m['mode_tv']:.3f} | {100 * m['off_mode']:.1f} % | {covered} |")
    summary = {name: {label: {k: float(m[k]) for k in ("mode_tv", "off_mode", "modes_covered")} for label, m in rows}
               for name, _, rows in results}  # fmt: skip
    Path(args.root).mkdir(parents=True, exist_ok=True)
    (Path(args.root) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
