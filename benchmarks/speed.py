"""Speed benchmarks (issue 8): lit_gen's training step vs a plain PyTorch loop, and teacher vs student sampling.

    python benchmarks/speed.py train  [--recipe recipes/digits/teacher.yaml] [--shards runs/digits_students/data/train]
                                      [--steps 200] [--warmup 20] [--rounds 2] [--memory-data]
    python benchmarks/speed.py sample --teacher CKPT --student CKPT [--n 1000] [--rounds 3]
    python benchmarks/speed.py methods --teacher CKPT --shards DIR --distil cd=recipes/digits/cd.yaml
                                       [--distil NAME=RECIPE ...] [--from-data NAME=RECIPE ...] [--steps 40]

train: the teacher recipe through `lit-gen fit` (in this process, everything a user gets: the shard stream, the
Lightning loop, EMA, checkpoints every 100 steps, the always-on guards, TensorBoard logging; progress bar off) against
a plain PyTorch loop with the same network (built from the same recipe and seed), batch size, loss
(`param.loss`, the same EDM maths), label dropout, optimizer and learning-rate schedule, gradient clipping and an
EMA of the weights, reading batches from an in-memory tensor. The time of each step is the wall time between the
starts of consecutive steps (data, forward, backward, update, callbacks: all of it), after `--warmup` steps. Runs
alternate lit_gen / plain `--rounds` times so that load changes hit both; the ratio is per round.
`--memory-data` adds a third run per round: the same `lit-gen fit` with the shard stream replaced by `MemoryData`
(the plain loop's in-memory batches), which splits lit_gen's extra time into the data stream and the rest (the
Lightning loop, logging, lit_gen's callbacks).

sample: wall time to draw N samples with the teacher at Heun 18 steps (35 NFE) and with a one-step student (1 NFE),
alternated `--rounds` times; the ratio of medians.

methods: the training-step cost of several methods' recipes side by side (issue 19: sCD's and MeanFlow's step
against CD's), each through `lit-gen fit` exactly as a user runs it (`--distil` recipes get `--model.init_args.teacher
CKPT`, `--from-data` ones train from the shards alone), the recipes alternated `--rounds` times; median wall time
between step starts after `--warmup` steps, and each method's ratio to the first one, per round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lit_gen.data.datamodule import ShardDataModule  # noqa: E402 - after the path insert

TIMES: list[float] = []  # step start times of the lit_gen run (filled by StepTimer, read by main)


class StepTimer(Callback):
    """Records the wall-clock time at the start of every training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        TIMES.append(time.perf_counter())


def step_stats(starts: list[float], warmup: int) -> tuple[float, float]:
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    return statistics.median(gaps), statistics.fmean(gaps)


class MemoryData(ShardDataModule):
    """A ShardDataModule (same arguments, dataset.json, hooks) whose training batches are the plain loop's: all
    samples decoded into memory once, each batch drawn by one random index tensor."""

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        reader = ShardDataModule(self.hparams["shards"], batch_size=1 << 20, steps_per_epoch=1, shuffle_buffer=0)
        batch = next(iter(reader.train_dataloader()))
        x_all, y_all, b = batch["x"], batch.get("label"), self.batch_size
        steps = self.num_batches_per_epoch()
        generator = torch.Generator().manual_seed(self.seed)

        class Batches:
            def __len__(self) -> int:
                return steps

            def __iter__(self):  # type: ignore[no-untyped-def]
                for _ in range(steps):
                    idx = torch.randint(0, x_all.shape[0], (b,), generator=generator)
                    yield {"x": x_all[idx]} if y_all is None else {"x": x_all[idx], "label": y_all[idx]}

        return Batches()


def run_lit_gen(recipe: str, shards: str, steps: int, root: Path, extra: list[str] = ()) -> list[float]:
    import speed  # this file under its import name: the CLI instantiates `speed.StepTimer` from it

    from lit_gen.cli import main

    speed.TIMES.clear()
    main([
        "fit", "-c", recipe, f"--data.init_args.shards={shards}", f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=speed.StepTimer", *extra,
    ])  # fmt: skip
    return list(speed.TIMES)


def run_plain(recipe: str, shards: str, steps: int) -> tuple[list[float], int]:
    """The same network, batch, loss, optimizer, schedule, clipping and EMA as the recipe, in a plain loop."""
    from lit_gen.cli import lightning_cli
    from lit_gen.data.datamodule import ShardDataModule

    cli = lightning_cli(["-c", recipe, f"--data.init_args.shards={shards}"], run=False)
    module, data = cli.model, cli.datamodule
    assert isinstance(data, ShardDataModule)
    net, param = module.net, module.param
    # All training data decoded once into memory (what a hand-written script for a small dataset would do).
    reader = ShardDataModule(shards, batch_size=4096, steps_per_epoch=1, shuffle_buffer=0)
    batch = next(iter(reader.train_dataloader()))
    x_all, y_all = batch["x"], batch.get("label")
    optimizer = module.configure_optimizers()
    optimizer, scheduler = (
        (optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"])
        if isinstance(optimizer, dict)
        else (optimizer, None)
    )
    ema = [p.detach().clone() for p in net.parameters()]
    beta = 0.5 ** (1 / 300)  # the recipe's EMA half-life of 300 steps
    clip = float(cli.trainer.gradient_clip_val or 0)
    b = data.batch_size
    generator = torch.Generator().manual_seed(0)
    num_classes = getattr(net, "num_classes", 0)
    dropout = getattr(module, "label_dropout", 0.0)
    net.train()
    starts = []
    for _ in range(steps):
        starts.append(time.perf_counter())
        idx = torch.randint(0, x_all.shape[0], (b,), generator=generator)
        y = x_all[idx]
        label = None
        if num_classes and y_all is not None:
            label = y_all[idx]
            drop = torch.rand(label.shape) < dropout
            label = torch.where(drop, torch.full_like(label, num_classes), label)
        loss = param.loss(net, y, label).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - beta)
        _ = float(loss)  # a plain loop logs its loss too
    starts.append(time.perf_counter())
    return starts, b


def train(args: argparse.Namespace) -> None:
    rows = []
    memory = ["--data=speed.MemoryData"]
    for r in range(args.rounds):
        root = Path(args.out) / f"round{r}"
        lit = run_lit_gen(args.recipe, args.shards, args.warmup + args.steps, root, args.fit_args)
        mem = None
        if args.memory_data:
            mem = run_lit_gen(args.recipe, args.shards, args.warmup + args.steps, root / "memory", memory)
        plain, batch = run_plain(args.recipe, args.shards, args.warmup + args.steps)
        (lm, la), (pm, pa) = step_stats(lit, args.warmup), step_stats(plain, args.warmup)
        mm, ma = step_stats(mem, args.warmup) if mem else (float("nan"), float("nan"))
        rows.append((r, lm, la, mm, ma, pm, pa))
        print(f"round {r}: lit_gen median {lm * 1e3:.1f} ms mean {la * 1e3:.1f} ms | in-memory lit_gen median "
              f"{mm * 1e3:.1f} ms | plain median {pm * 1e3:.1f} ms mean {pa * 1e3:.1f} ms | ratio median "
              f"{lm / pm:.3f} mean {la / pa:.3f}", flush=True)  # fmt: skip
    print(f"\n{machine()}\nrecipe {args.recipe}, batch {batch}, {args.steps} timed steps after {args.warmup}\n")
    print("| round | lit_gen median ms/step | lit_gen in-memory data median | plain median ms/step | ratio (median) | "
          "ratio in-memory / plain (median) | lit_gen mean | in-memory mean | plain mean | ratio (mean) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r, lm, la, mm, ma, pm, pa in rows:
        print(f"| {r} | {lm * 1e3:.1f} | {mm * 1e3:.1f} | {pm * 1e3:.1f} | {lm / pm:.3f} | {mm / pm:.3f} | "
              f"{la * 1e3:.1f} | {ma * 1e3:.1f} | {pa * 1e3:.1f} | {la / pa:.3f} |")  # fmt: skip


def sample(args: argparse.Namespace) -> None:
    from lit_gen.export import load_model

    teacher, student = load_model(args.teacher), load_model(args.student)
    t_times, s_times = [], []
    with torch.no_grad():
        teacher.sample(16, steps=2, sampler="heun", seed=0)
        student.sample(16, steps=1, seed=0)  # warm-up
        for r in range(args.rounds):
            start = time.perf_counter()
            teacher.sample(args.n, steps=18, sampler="heun", seed=r)
            t_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            student.sample(args.n, steps=1, seed=r)
            s_times.append(time.perf_counter() - start)
            print(f"round {r}: teacher 35 NFE {t_times[-1]:.3f} s, student 1 NFE {s_times[-1]:.4f} s", flush=True)
    t, s = statistics.median(t_times), statistics.median(s_times)
    print(f"\n{machine()}\n")
    print("| model | NFE | samples | wall s (median) | samples/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| teacher ({args.teacher}) | 35 | {args.n} | {t:.3f} | {args.n / t:.0f} | 1 |")
    print(f"| student ({args.student}) | 1 | {args.n} | {s:.4f} | {args.n / s:.0f} | {t / s:.1f}x faster |")


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average {load[0]:.1f}")  # fmt: skip


def methods(args: argparse.Namespace) -> None:
    specs = [(*item.split("=", 1), True) for item in args.distil] + [
        (*item.split("=", 1), False) for item in args.from_data
    ]
    if not specs or any(len(spec) != 3 for spec in specs):
        raise SystemExit("methods: give NAME=RECIPE to --distil / --from-data (at least one)")
    medians: dict[str, list[float]] = {name: [] for name, _, _ in specs}
    for r in range(args.rounds):
        for name, recipe, distil in specs:
            extra = [f"--model.init_args.teacher={args.teacher}"] if distil else []
            times = run_lit_gen(recipe, args.shards, args.warmup + args.steps, Path(args.out) / f"{name}{r}", extra)
            medians[name].append(step_stats(times, args.warmup)[0])
            print(f"round {r}: {name} median {medians[name][-1] * 1e3:.1f} ms/step", flush=True)
    first = specs[0][0]
    print(f"\n{machine()}\nshards {args.shards}, {args.steps} timed steps after {args.warmup}, {args.rounds} rounds\n")
    print("| method | recipe | median ms/step per round | × " + first + " per round |")
    print("| --- | --- | --- | --- |")
    for name, recipe, _ in specs:
        ms = " / ".join(f"{m * 1e3:.0f}" for m in medians[name])
        ratio = " / ".join(f"{m / f:.2f}" for m, f in zip(medians[name], medians[first], strict=True))
        print(f"| {name} | {recipe} | {ms} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train")
    p.add_argument("--recipe", default="recipes/digits/teacher.yaml")
    p.add_argument("--shards", default="runs/digits_students/data/train")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--memory-data", action="store_true", help="also time lit-gen fit on in-memory batches")
    p.add_argument("--out", default="runs/bench/speed")
    p.add_argument("fit_args", nargs="*", help="more `lit-gen fit` arguments for the lit_gen run (after --)")
    p = sub.add_parser("sample")
    p.add_argument("--teacher", default="runs/digits_students/teacher/checkpoints/last.ckpt")
    p.add_argument("--student", default="runs/digits_students/fdistill_js/checkpoints/last.ckpt")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("methods")
    p.add_argument("--teacher", default="runs/quickstart/teacher/checkpoints/last.ckpt")
    p.add_argument("--shards", default="runs/quickstart/data/train")
    p.add_argument("--distil", nargs="+", action="extend", default=[], help="NAME=RECIPE trained from --teacher")
    p.add_argument("--from-data", nargs="+", action="extend", default=[], help="NAME=RECIPE trained from the shards")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="runs/bench/speed_methods")
    args = parser.parse_args()
    {"train": train, "sample": sample, "methods": methods}[args.what](args)


if __name__ == "__main__":
    main()
