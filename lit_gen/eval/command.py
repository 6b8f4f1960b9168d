"""``lit-gen eval``: score checkpoints against reference shards, one markdown table row (or JSON object) per model and
step count.

    lit-gen eval --ckpt PATH [PATH ...] --ref SHARDS [--metric NAME ...] [--steps K ...] [--n N] [--seed S]
                 [--sampler NAME] [--weights ema|raw] [--n-ref N] [--device D] [--inception-weights FILE]
                 [--json] [--out FILE]

Wiring into ``lit_gen.cli``: ``add_parser(sub)`` on the tools parser's subparsers; the handler is ``ns.func``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Written out rather than built from ``runner.METRICS``: building the parser must not import torch (``lit-gen --help``
# and the other tools stay fast). tests/test_eval_cli.py checks that both name every metric.
METRIC_NAMES = ("fd", "fd_raw", "fd_digits", "fid", "mixture", "pr", "is", "c2st", "elbo", "nll")
METRIC_HELP = (
    "fd: Fréchet distance in the data's feature space (raw values for points, the digits classifier for 1x8x8 images, "
    "Inception-v3 otherwise); fd_raw: FD on the raw values; fd_digits: FD on digits-classifier features; "
    "fid: FD on Inception-v3 features (local weights: --inception-weights, LIT_GEN_INCEPTION_WEIGHTS or the cache); "
    "mixture: mode_tv, off_mode, modes_covered of a built-in 2-D mixture; pr: precision/recall (k=3); "
    "is: Inception score with the data's classifier; "
    "c2st: classifier two-sample test, the cross-validated held-out accuracy of a small classifier telling real "
    "from generated samples (0.5 = indistinguishable); "
    "elbo: negative ELBO of the reference data under a teacher (prior + importance-sampled diffusion + reconstruction "
    "terms); nll: its exact NLL by the probability-flow ODE (--likelihood-steps, --trace, --likelihood-seed). "
    "elbo and nll are nats/dim in the data's own units for points, bits/dim on the 8-bit scale for images "
    "(uniform dequantisation)"
)


def add_parser(subparsers: Any) -> None:
    """Register the ``eval`` sub-command on an argparse ``add_subparsers()`` object (sets ``func=run``)."""
    p = subparsers.add_parser(
        "eval",
        help="score checkpoints against reference shards (FD, mixture metrics, ...) at several step counts",
        description="Sample each model at each step count and score the samples against the reference shards. "
        f"Metrics: {METRIC_HELP}.",
    )
    p.add_argument("--ckpt", nargs="+", action="extend", required=True, help=".ckpt or exported .safetensors (1+)")
    p.add_argument("--ref", required=True, help="reference shard folder written by lit-gen shards")
    p.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        default=None,
        help="metrics (default: fd, plus mixture for built-in 2-D mixtures, plus c2st for images): "
        + " ".join(METRIC_NAMES),
    )
    p.add_argument("--steps", nargs="+", action="extend", type=int, default=None, help="step counts (default: model's)")
    p.add_argument("--n", type=int, default=None, help="generated samples per row (default: #reference, max 10000)")
    p.add_argument("--n-ref", type=int, default=None, help="reference samples to use (default: all, max 50000)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, the same for every row (default 0)")
    p.add_argument("--sampler", default=None, help="heun | euler | ddim (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance weight w (as lit-gen sample; default 1)")
    p.add_argument("--allow-extrapolation", action="store_true", help="a w-conditioned student outside its w range")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--device", default="cpu", help="torch device for sampling and features (default cpu)")
    p.add_argument("--inception-weights", default=None, help="FID Inception-v3 weights file (else the env var/cache)")
    p.add_argument(
        "--likelihood-steps", type=int, default=32, help="nll: fixed RK4 steps of the probability-flow ODE (default 32)"
    )
    p.add_argument(
        "--trace",
        choices=("auto", "exact", "hutchinson"),
        default="auto",
        help="nll: divergence by the exact trace or Hutchinson's estimator (auto: exact up to 16 dims)",
    )
    p.add_argument("--likelihood-seed", type=int, default=None, help="elbo/nll: their own seed (default: --seed)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a markdown table")
    p.add_argument("--out", default=None, help="also write the table (.md) or rows (.json) to this file")
    p.set_defaults(func=run)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``eval`` handler: evaluate, print, optionally write ``--out``; returns the rows."""
    from lit_gen.errors import LitGenError
    from lit_gen.eval.likelihood import LikelihoodOptions
    from lit_gen.eval.runner import Evaluator, format_table
    from lit_gen.export import usable_device

    if ns.n is not None and ns.n < 4:
        raise LitGenError(f"--n must be at least 4, got {ns.n}")
    if ns.steps is not None and any(k < 1 for k in ns.steps):
        raise LitGenError(f"--steps must be at least 1, got {min(ns.steps)}")
    if ns.out is not None and Path(ns.out).suffix not in (".md", ".json", ".txt"):
        raise LitGenError(f"--out must end in .md, .txt or .json, got {ns.out}")
    usable_device(ns.device)
    start = time.time()
    likelihood = LikelihoodOptions(steps=ns.likelihood_steps, trace=ns.trace, seed=ns.likelihood_seed)
    evaluator = Evaluator(
        ns.ref,
        ns.metric,
        n_ref=ns.n_ref,
        device=ns.device,
        inception_weights=ns.inception_weights,
        seed=ns.seed,
        likelihood=likelihood,
    )
    rows: list[dict[str, Any]] = []
    for i, path in enumerate(ns.ckpt):
        new = evaluator.evaluate(
            path,
            steps=ns.steps,
            n=ns.n,
            seed=ns.seed,
            sampler=ns.sampler,
            weights=ns.weights,
            guidance=ns.guidance,
            allow_extrapolation=ns.allow_extrapolation,
        )
        rows += new
        if not ns.json:  # rows appear as they are computed
            print(format_table(new, header=i == 0), flush=True)
    rows_json = json.dumps([{k: _json_value(v) for k, v in row.items()} for row in rows], indent=2)
    if ns.json:
        print(rows_json)
    if ns.out is not None:
        out = Path(ns.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rows_json + "\n" if out.suffix == ".json" else format_table(rows) + "\n")
    print(f"evaluated {len(rows)} row(s) against {ns.ref} in {time.time() - start:.1f}s", file=sys.stderr)
    return rows
