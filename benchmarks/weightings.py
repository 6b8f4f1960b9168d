"""Compare loss weightings w(λ) and noise distributions p(λ) (Kingma & Gao 2023) on toy2d at one training budget:
sample quality (exact mixture metrics) and likelihood (negative ELBO, PF-ODE NLL) against the true cross-entropy.

    OMP_NUM_THREADS=1 python benchmarks/weightings.py [--max-steps 600] [--configs edm sigmoid-2 ...] [--n 8192]
    OMP_NUM_THREADS=1 python benchmarks/weightings.py --dataset digits --max-steps 1000 --configs edm sigmoid-2-adaptive

Each config trains `recipes/toy2d/teacher.yaml` (EDM parameterisation, MLP) with only the objective changed
(``--model.init_args.weighting/weighting_bias/noise_schedule``), for ``--max-steps`` steps with the learning rate
decayed to 0 at the last step. Quality: ``--n`` samples (Heun, 18 steps) scored by ``mixture_metrics``. Likelihood:
``--n-eval`` held-out points (seed 12345, never trained on), ``lit_gen.eval.likelihood`` in nats/dim (data units);
the true cross-entropy −E log p_true(x) / 2 of the same points is printed next to them (an ELBO is at or above it
in expectation; a good model's NLL is close to it).

``--dataset digits`` trains `recipes/digits/teacher.yaml` instead and scores with ``lit_gen.eval.Evaluator``: FD in
the digits classifier's features (1797 samples, Heun 18 steps) and ELBO / NLL in bits/dim of the 1797 digits
themselves (the only digits there are: training data, not held out; Hutchinson's trace for 64 dimensions).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.eval.likelihood import LikelihoodOptions, likelihood_scores
from lit_gen.export import load_model

CONFIGS: dict[str, list[str]] = {
    "edm": [],  # today's loss: EDM weighting, EDM log-normal p(λ)
    "elbo-adaptive": ["--model.init_args.weighting=elbo", "--model.init_args.noise_schedule=adaptive"],
    "sigmoid-2-adaptive": [
        "--model.init_args.weighting=sigmoid",
        "--model.init_args.weighting_bias=-2",
        "--model.init_args.noise_schedule=adaptive",
    ],
    "sigmoid+4-adaptive": [
        "--model.init_args.weighting=sigmoid",
        "--model.init_args.weighting_bias=4",
        "--model.init_args.noise_schedule=adaptive",
    ],
    "sigmoid+4-uniform": [
        "--model.init_args.weighting=sigmoid",
        "--model.init_args.weighting_bias=4",
        "--model.init_args.noise_schedule=uniform",
    ],
    "v-cosine": ["--model.init_args.weighting=v", "--model.init_args.noise_schedule=cosine"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dataset", default="toy2d", choices=["toy2d", "digits"])
    parser.add_argument("--mixture", default="gmm8", choices=list(TOY2D))
    parser.add_argument("--recipe", default="recipes/toy2d/teacher.yaml")
    parser.add_argument("--root", default="runs/bench/weightings")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=8192, help="samples for the mixture metrics")
    parser.add_argument("--n-eval", type=int, default=2000, help="held-out points for ELBO / NLL")
    parser.add_argument("--skip-fit", action="store_true", help="reuse checkpoints already in --root")
    args = parser.parse_args()
    if args.dataset == "digits":
        digits(args)
        return
    data = Path(args.root) / "data" / args.mixture
    if not data.exists():
        cli = [sys.executable, "-m", "lit_gen.cli"]
        subprocess.run([*cli, "shards", f"builtin:toy2d:{args.mixture}", "--out", str(data)], check=True)
    mixture = TOY2D[args.mixture]
    held_out, _ = mixture.sample(args.n_eval, seed=12345)
    cross_entropy = float(-mixture.log_prob(held_out).mean() / 2)
    rows = []
    for name in args.configs:
        root = Path(args.root) / f"{name}_{args.max_steps}"
        fit_s = fit(args, args.recipe, data, root, name)
        model = load_model(root / "checkpoints" / "last.ckpt")
        points = model.sample(args.n, steps=18, sampler="heun", seed=1).numpy()
        quality = mixture_metrics(points, mixture)
        start = time.time()
        lik = likelihood_scores(model, torch.from_numpy(held_out), None, ["elbo", "nll"], options=LikelihoodOptions())
        lik_s = time.time() - start
        rows.append((name, fit_s, quality, lik, lik_s))
        print(name, f"fit {fit_s:.0f}s", quality, lik, f"likelihood {lik_s:.0f}s", flush=True)
    print(f"\ntrue cross-entropy of the {args.n_eval} held-out points: {cross_entropy:.3f} nats/dim")
    print("| objective | steps | fit wall (s) | mode TV | off-mode | modes | −ELBO (nats/dim) | NLL (nats/dim) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, fit_s, q, lik, _ in rows:
        print(
            f"| {name} | {args.max_steps} | {fit_s:.0f} | {q['mode_tv']:.3f} | {100 * q['off_mode']:.1f} % | "
            f"{q['modes_covered']}/{q['num_modes']} | {lik['elbo']:.3f} | {lik['nll']:.3f} |"
        )


def fit(args: argparse.Namespace, recipe: str, data: Path, root: Path, name: str) -> float:
    start = time.time()
    if not args.skip_fit:
        subprocess.run(
            [sys.executable, "-m", "lit_gen.cli", "fit", "-c", recipe, f"--data.init_args.shards={data}",
             f"--trainer.default_root_dir={root}", f"--trainer.max_steps={args.max_steps}",
             f"--model.init_args.decay_steps={args.max_steps}", "--trainer.enable_progress_bar=false", *CONFIGS[name]],
            check=True,
        )  # fmt: skip
    return time.time() - start


def digits(args: argparse.Namespace) -> None:
    from lit_gen.eval.runner import Evaluator

    data = Path(args.root) / "data" / "digits"
    if not data.exists():
        subprocess.run(
            [sys.executable, "-m", "lit_gen.cli", "shards", "builtin:digits", "--out", str(data)], check=True
        )
    evaluator = Evaluator(data, metrics=["fd", "elbo", "nll"], likelihood=LikelihoodOptions())
    rows = []
    for name in args.configs:
        root = Path(args.root) / f"digits_{name}_{args.max_steps}"
        fit_s = fit(args, "recipes/digits/teacher.yaml", data, root, name)
        (row,) = evaluator.evaluate(root / "checkpoints" / "last.ckpt", steps=[18], n=len(evaluator.reference))
        rows.append((name, fit_s, row))
        print(name, f"fit {fit_s:.0f}s", row, flush=True)
    print("| objective | steps | fit wall (s) | FD (digits features) | −ELBO (bits/dim) | NLL (bits/dim) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, fit_s, row in rows:
        print(f"| {name} | {args.max_steps} | {fit_s:.0f} | {row['fd']:.3f} | {row['elbo']:.3f} | {row['nll']:.3f} |")


if __name__ == "__main__":
    main()
