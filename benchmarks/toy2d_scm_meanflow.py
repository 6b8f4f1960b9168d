"""sCD and MeanFlow on the toy 2-D held-out mixture: 1- and 2-step mode metrics, and the cost of a training step
against consistency distillation's (issue 19).

    python benchmarks/toy2d_scm_meanflow.py [--mixture gmm5_heldout] [--n 8192] [--skip-fit] [--scd RUN] [--mf RUN]
        [--extra-scd ARGS...] [--extra-mf ARGS...] [--only scd|meanflow] [--no-costs]

Uses the teacher of `benchmarks/toy2d_teacher.py` (runs/bench/toy2d_teacher/<mixture>, shards next to it). Fits
`recipes/toy2d/scm.yaml` (sCD from that teacher) and `recipes/toy2d/meanflow.yaml` (from the shards) in subprocesses
(timed) unless --skip-fit, then draws N samples with seed 1 at 1 and 2 steps (`lit-gen sample --steps K`'s path:
the checkpoint's own sampler and grid) and scores them with `mixture_metrics` (mode-weight TV, off-mode mass beyond
3 σ of every mode — true samples have 1.1 % there —, modes covered). The issue's bar: 1 step TV <= 0.08 and
off-mode <= 10 %, 2 steps TV <= 0.05.

Step cost: forward + backward of one batch (1024 points) for CD (recipes/toy2d/cd.yaml's settings), sCD (JVP by
autograd and by finite difference) and MeanFlow, in this process, interleaved, median of --reps; one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.export import load_model


def fit(recipe: str, root: Path, shards: Path, teacher: Path | None, extra: list[str]) -> float:
    command = [sys.executable, "-m", "lit_gen.cli", "fit", "-c", recipe, f"--data.init_args.shards={shards}",
               f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra]  # fmt: skip
    if teacher is not None:
        command.append(f"--model.init_args.teacher={teacher}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.time()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.time() - start


def step_costs(teacher: Path, reps: int) -> dict[str, float]:
    """Median seconds of loss + backward per method on one batch of 1024 points."""
    from lit_gen.methods.consistency import ConsistencyDistillation
    from lit_gen.methods.meanflow import MeanFlowTraining
    from lit_gen.methods.scm import SCM
    from lit_gen.nets import MLPDenoiser

    torch.manual_seed(0)
    methods = {
        "CD (Heun teacher step, N = 12)": (
            ConsistencyDistillation(teacher=str(teacher), num_scales=12, weighting="ict"),
            lambda m, y: m.consistency_loss(y, None, 12),
        ),
        "sCD (jvp: autograd)": (SCM(teacher=str(teacher)), lambda m, y: m.scm_loss(y, None)),
        "sCD (jvp: finite)": (SCM(teacher=str(teacher), jvp="finite"), lambda m, y: m.scm_loss(y, None)),
        "MeanFlow (jvp: autograd)": (
            MeanFlowTraining(net=MLPDenoiser(dim=2, hidden=256, depth=4, aux_time=True)),
            lambda m, y: m.meanflow_loss(y, None),
        ),
    }
    y = torch.randn(1024, 2) * 0.5
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, (method, loss_fn) in methods.items():
            method.train()
            method.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_fn(method, y).mean().backward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixture", default="gmm5_heldout")
    parser.add_argument("--teacher-root", default="runs/bench/toy2d_teacher")
    parser.add_argument("--root", default="runs/bench/toy2d_scm_meanflow")
    parser.add_argument("--scd", help="score this sCD run folder instead of <root>/<mixture>/scd")
    parser.add_argument("--mf", help="score this MeanFlow run folder instead of <root>/<mixture>/meanflow")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--extra-scd", nargs="*", default=[])
    parser.add_argument("--extra-mf", nargs="*", default=[])
    parser.add_argument("--only", choices=["scd", "meanflow"], help="fit/score one method (meanflow needs no teacher)")
    parser.add_argument("--no-costs", action="store_true", help="skip the step-cost table (it needs the teacher)")
    args = parser.parse_args()
    teacher = Path(args.teacher_root) / args.mixture / "checkpoints" / "last.ckpt"
    shards = Path(args.teacher_root) / "data" / args.mixture
    needs_teacher = args.only != "meanflow" or not args.no_costs
    if needs_teacher and not teacher.is_file():
        sys.exit(f"no teacher at {teacher}: run benchmarks/toy2d_teacher.py --mixtures {args.mixture} first")
    runs = {
        "sCD": (Path(args.scd) if args.scd else Path(args.root) / args.mixture / "scd", "recipes/toy2d/scm.yaml",
                teacher, args.extra_scd),
        "MeanFlow": (Path(args.mf) if args.mf else Path(args.root) / args.mixture / "meanflow",
                     "recipes/toy2d/meanflow.yaml", None, args.extra_mf),
    }  # fmt: skip
    if args.only:
        runs = {name: run for name, run in runs.items() if name.lower() == args.only}
    spec = TOY2D[args.mixture]
    rows = []
    for name, (root, recipe, source, extra) in runs.items():
        fit_s = "-" if args.skip_fit else f"{fit(recipe, root, shards, source, extra):.0f}"
        model = load_model(root / "checkpoints" / "last.ckpt")
        for steps in (1, 2):
            m = mixture_metrics(model.sample(args.n, steps=steps, seed=1).numpy(), spec)
            rows.append(
                f"| {name} | {model.description['sampling']['sampler']} | {steps} | {fit_s} | {m['mode_tv']:.3f} | "
                f"{100 * m['off_mode']:.1f} % | {m['modes_covered']}/{m['num_modes']} |"
            )
            print(rows[-1], flush=True)
    print(f"\n{args.mixture}: {args.n} samples, seed 1")
    print("| model | sampler | steps | fit wall (s) | mode TV | off-mode | modes covered |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if args.no_costs:
        return
    torch.set_num_threads(1)
    costs = step_costs(teacher, args.reps)
    base = costs["CD (Heun teacher step, N = 12)"]
    print("\n| method | loss + backward, batch 1024 (ms) | × CD |\n| --- | --- | --- |")
    for name, seconds in costs.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
