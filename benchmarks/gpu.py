"""One-GPU benchmark (issue 20): images/s, model FLOP utilisation and peak memory of the CIFAR-10 recipes.

    python benchmarks/gpu.py                 # on one GPU: about 5-8 minutes on an H100/H200, prints one table
    python benchmarks/gpu.py --tiny          # the same code on the CPU with a tiny U-Net, in seconds (CI runs it)
    python benchmarks/gpu.py --methods teacher fdistill --variants eager compile+cl --steps 50

What runs: ``lit-gen fit`` itself (in this process: the recipe's shard stream, Lightning loop, EMA and checkpoint
callbacks, the always-on guards, TensorBoard logging) on random CIFAR-shaped shards (3x32x32 uint8, 10 classes) with
each recipe of recipes/cifar10 (teacher, tract, cd, fdistill_js, sct, sCD = sct with the teacher, meanflow) at its
own batch size and bf16-mixed precision. The distillation recipes get the teacher trained by the first cell as their
teacher (speed does not depend on the weights). Variants of every recipe:

- ``eager``: as shipped;
- ``cl``: channels-last weights (``callbacks.compile.Compile(compile=false, channels_last=true)``);
- ``compile+cl``: ``torch.compile`` of the hot-path networks plus channels-last (``callbacks.compile.Compile``).

Then the teacher recipe under DeepSpeed ZeRO-2 vs DDP on the same single device (each in its own process, since
both start a process group): ``recipes/scale/deepspeed_stage2.yaml`` / ``ddp.yaml`` with ``--trainer.devices 1``.

Measured per cell: the median wall time between the starts of consecutive training steps after ``--warmup`` steps
(synchronised with the device), images/s = batch / that time (f-distill: generator samples drawn per step, critic
steps included), peak device memory (``torch.cuda.max_memory_allocated``; "-" on the CPU), and the model FLOPs of
one training step counted by ``torch.utils.flop_counter.FlopCounterMode`` over the last 5 warm-up steps of the eager
cell, averaged (forward + backward of every network the steps run: matmuls, convolutions, attention; 5 = f-distill's
update_ratio, whose critic-only and generator steps cost differently). MFU = FLOPs/step x
steps/s / the device's dense bf16 peak (``--peak-tflops``, default from the device name: H100/H200 989, A100 312).
The same FLOPs/step are used for the variants (they compute the same thing). Goal (issue 20): teacher MFU >= 35 %.

``--budget-s`` (default 420) bounds the whole run: cells that would start after it are listed as skipped, so the
table always prints. Results go to stdout and ``OUT/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPES = {
    "teacher": "recipes/cifar10/teacher.yaml",
    "tract": "recipes/cifar10/tract.yaml",
    "cd": "recipes/cifar10/cd.yaml",
    "fdistill": "recipes/cifar10/fdistill_js.yaml",
    "sct": "recipes/cifar10/sct.yaml",
    "scd": "recipes/cifar10/sct.yaml",
    "meanflow": "recipes/cifar10/meanflow.yaml",
}
# sCD: the sCT recipe distilling the teacher instead (its own TrigFlow network; the same cost per step as sCT plus
# one teacher forward, the number to set beside CD's).
METHOD_ARGS = {
    "scd": ["--model.init_args.training=scd", "--model.init_args.init_from_teacher=false",
            "--model.init_args.net.init_args.dropout=0"],  # distilled students train with dropout 0
}  # fmt: skip
# Recipes trained from data alone (no --model.init_args.teacher) and recipes with a network of their own (--tiny
# shrinks it; the other students inherit the teacher's).
FROM_DATA = {"teacher", "sct", "meanflow"}
OWN_NET = FROM_DATA | {"scd"}
VARIANTS = {
    "eager": [],
    "cl": ["--trainer.callbacks+=callbacks.compile.Compile", "--trainer.callbacks.compile=false",
           "--trainer.callbacks.channels_last=true"],
    "compile+cl": ["--trainer.callbacks+=callbacks.compile.Compile", "--trainer.callbacks.channels_last=true"],
}  # fmt: skip
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
# The tiny network of --tiny (the teacher recipe's UNet, shrunk; the students inherit it from the teacher).
TINY_NET = [
    "--model.init_args.net.init_args.img_resolution=8", "--model.init_args.net.init_args.model_channels=16",
    "--model.init_args.net.init_args.channel_mult=[1, 2]", "--model.init_args.net.init_args.num_blocks=1",
    "--model.init_args.net.init_args.attn_resolutions=[4]",
]  # fmt: skip

# FLOPs are counted over the last FLOP_STEPS warm-up steps and averaged: f-distill's cycle of update_ratio = 5 steps
# (critic-only steps, then one with the generator's update too) has steps of different cost.
FLOP_STEPS = 5
# Filled by Probe during a fit (read by run_cell): step start times, FLOPs of one step, peak memory.
STATE: dict[str, Any] = {}


class Probe(Callback):
    """Times training steps, counts one step's FLOPs, records peak memory; saves the module at the end if asked
    (``STATE["save_to"]``)."""

    def __init__(self) -> None:
        self.counter: Any = None

    @staticmethod
    def _sync(pl_module: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._sync(pl_module)
        STATE["starts"].append(time.perf_counter())
        if STATE.get("count_flops") and trainer.global_step == STATE["warmup"] - FLOP_STEPS:
            from torch.utils.flop_counter import FlopCounterMode

            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.counter is not None and trainer.global_step == STATE["warmup"]:
            self.counter.__exit__(None, None, None)
            STATE["flops"] = self.counter.get_total_flops() / FLOP_STEPS
            self.counter = None

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._sync(pl_module)
        STATE["starts"].append(time.perf_counter())
        if pl_module.device.type == "cuda":
            STATE["peak"] = torch.cuda.max_memory_allocated(pl_module.device)
        if STATE.get("save_to"):
            trainer.save_checkpoint(STATE["save_to"])


def make_shards(out: Path, n: int, size: int) -> Path:
    """Random CIFAR-shaped images (uint8, 10 classes) as shards, via ``lit-gen shards``' writer."""
    from lit_gen.data.shards import write_shards

    shards = out / f"data{size}"
    if (shards / "dataset.json").exists():
        return shards
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "images.npz", x=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), y=np.arange(n) % 10)
    write_shards(str(out / "images.npz"), shards, shard_size=max(1, n // 8))
    return shards


def fit_args(args: argparse.Namespace, method: str, shards: Path, root: Path, teacher: Path) -> list[str]:
    out = ["fit", "-c", str(REPO / RECIPES[method])]
    out += ["--trainer.devices=1"]
    if args.tiny:
        out += ["--trainer.accelerator=cpu", f"--data.init_args.batch_size={args.batch}"]
        out += TINY_NET if method in OWN_NET else []
    elif args.batch:
        out += [f"--data.init_args.batch_size={args.batch}"]
    if method not in FROM_DATA:
        out += [f"--model.init_args.teacher={teacher}"]
    return out + METHOD_ARGS.get(method, []) + [
        f"--data.init_args.shards={shards}", f"--data.init_args.num_workers={args.workers}",
        "--data.init_args.shuffle_buffer=100", f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={args.warmup + args.steps}", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=gpu.Probe",
    ]  # fmt: skip


def run_cell(args: argparse.Namespace, method: str, variant: str, shards: Path, teacher: Path) -> dict[str, Any]:
    import gpu  # this file under its import name: the CLI instantiates `gpu.Probe` from it

    from lit_gen.cli import main

    root = Path(args.out) / f"{method}-{variant}"
    gpu.STATE.clear()
    gpu.STATE.update(starts=[], warmup=args.warmup, count_flops=variant == "eager")
    if method == "teacher" and variant == "eager":
        gpu.STATE["save_to"] = str(teacher)
    extra = list(VARIANTS[variant])
    if variant != "eager" and args.compile_backend:
        extra += [f"--trainer.callbacks.backend={args.compile_backend}"] if "compile" in variant else []
    start = time.perf_counter()
    main([*fit_args(args, method, shards, root, teacher), *extra])
    wall = time.perf_counter() - start
    starts = gpu.STATE["starts"]
    gaps = [b - a for a, b in zip(starts[args.warmup :], starts[args.warmup + 1 :], strict=False)]
    return {
        "method": method, "variant": variant, "step_s": statistics.median(gaps), "flops": gpu.STATE.get("flops"),
        "peak": gpu.STATE.get("peak"), "wall_s": wall,
    }  # fmt: skip


def run_engine(args: argparse.Namespace, engine: str, shards: Path, teacher: Path) -> dict[str, Any]:
    """The teacher recipe under DDP or DeepSpeed ZeRO-2 on one device, in a child process (process groups)."""
    root = Path(args.out) / f"teacher-{engine}"
    result = root / "probe.json"
    if args.tiny:
        overlay = (
            ["--trainer.strategy=ddp"] if engine == "ddp" else ["-c", str(REPO / "recipes/scale/deepspeed_cpu.yaml")]
        )
        overlay += ["--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    else:
        name = "ddp.yaml" if engine == "ddp" else "deepspeed_stage2.yaml"
        overlay = ["-c", str(REPO / "recipes/scale" / name), "--trainer.devices=1"]
    code = (
        "import json, sys, gpu\n"
        "from lit_gen.cli import main\n"
        f"gpu.STATE.update(starts=[], warmup={args.warmup})\n"
        "main(sys.argv[1:])\n"
        f"json.dump({{k: gpu.STATE.get(k) for k in ('starts', 'peak')}}, open({str(result)!r}, 'w'))\n"
    )
    path = [str(REPO / "benchmarks"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if engine == "zero2" and args.tiny:
        env["DS_ACCELERATOR"] = "cpu"
    argv = [*fit_args(args, "teacher", shards, root, teacher), *overlay]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": "teacher", "variant": engine, "error": tail[0][:200], "wall_s": wall}
    data = json.loads(result.read_text())
    starts = data["starts"]
    gaps = [b - a for a, b in zip(starts[args.warmup :], starts[args.warmup + 1 :], strict=False)]
    return {"method": "teacher", "variant": engine, "step_s": statistics.median(gaps), "peak": data["peak"],
            "wall_s": wall}  # fmt: skip


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def batch_of(args: argparse.Namespace, method: str) -> int:
    if args.batch:
        return args.batch
    import yaml

    return int(yaml.safe_load((REPO / RECIPES[method]).read_text())["data"]["init_args"]["batch_size"])


def table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    peak = peak_tflops(args)
    flops = {r["method"]: r["flops"] for r in rows if r.get("flops")}
    head = "| recipe | variant | batch | ms/step | images/s | GFLOP/step | TFLOP/s | MFU | peak mem GiB | wall s |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['method']} | {r['variant']} | | {r.get('error', 'skipped')} | | | | | | |")
            continue
        b, f = batch_of(args, r["method"]), flops.get(r["method"])
        tflops = f / r["step_s"] / 1e12 if f else None
        gflop = f"{f / 1e9:.2f}" if f else "-"
        rate = f"{tflops:.3f}" if tflops else "-"
        mfu = f"{100 * tflops / peak:.1f} %" if tflops and peak else "-"
        mem = f"{r['peak'] / 2**30:.2f}" if r.get("peak") else "-"
        lines.append(
            f"| {r['method']} | {r['variant']} | {b} | {1e3 * r['step_s']:.1f} | {b / r['step_s']:.0f} | {gflop} | "
            f"{rate} | {mfu} | {mem} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def machine(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "CPU"
    peak = peak_tflops(args)
    return (
        f"{device} (peak {peak or '?'} TFLOP/s bf16 dense), {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the same code on the CPU with a tiny U-Net (CI)")
    parser.add_argument("--out", default="runs/bench/gpu")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--engines", nargs="*", default=["ddp", "zero2"], choices=["ddp", "zero2"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 30; tiny 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; tiny 2)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default: the recipe's; tiny 4)")
    parser.add_argument("--workers", type=int, default=None, help="data workers (default 8; tiny 0)")
    parser.add_argument("--images", type=int, default=None, help="random images in the shards (default 8192)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny eager)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default by name)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no cell after this many seconds")
    args = parser.parse_args()
    tiny = args.tiny
    args.steps = args.steps or (3 if tiny else 30)
    args.warmup = max(args.warmup or (6 if tiny else 10), FLOP_STEPS + 1)
    args.batch = args.batch or (4 if tiny else None)
    args.workers = args.workers if args.workers is not None else (0 if tiny else 8)
    args.compile_backend = args.compile_backend or ("eager" if tiny else None)
    if not tiny and not torch.cuda.is_available():
        parser.error("no GPU here: run with --tiny (the CPU check), or on a GPU machine")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    shards = make_shards(out, args.images or (64 if tiny else 8192), 8 if tiny else 32)
    teacher = out / "teacher.ckpt"
    begin, rows = time.perf_counter(), []
    if "teacher" not in args.methods and not teacher.exists():
        parser.error(f"the students need {teacher}: include the teacher in --methods once")
    # Cheap cells first, torch.compile last (its compile time is what can overrun the budget); the teacher's eager
    # cell before everything: it writes the teacher the students distill.
    order = sorted(args.methods, key=list(RECIPES).index)
    jobs: list[tuple[str, str]] = [(m, v) for v in args.variants if v != "compile+cl" for m in order]
    jobs += [("engine", e) for e in args.engines] + [(m, "compile+cl") for m in order if "compile+cl" in args.variants]
    if "teacher" in args.methods:
        jobs = [("teacher", "eager")] + [j for j in jobs if j != ("teacher", "eager")]
    for method, variant in jobs:
        name = "teacher" if method == "engine" else method
        if time.perf_counter() - begin > args.budget_s:
            rows.append({"method": name, "variant": variant, "error": f"skipped: over --budget-s {args.budget_s:g}"})
            continue
        if method == "engine":
            rows.append(run_engine(args, variant, shards, teacher))
        else:
            try:
                rows.append(run_cell(args, method, variant, shards, teacher))
            except (Exception, SystemExit) as err:  # one failing cell (a kernel without forward AD, say) is a row
                traceback.print_exc()
                rows.append({"method": name, "variant": variant, "error": f"failed: {str(err)[:160] or type(err)}"})
        row = rows[-1]
        print(f"{name} {variant}: " + (row["error"] if "error" in row else f"{1e3 * row['step_s']:.1f} ms/step"))
    text = f"{machine(args)}; {args.steps} timed steps after {args.warmup}; total {time.perf_counter() - begin:.0f} s"
    print(f"\n{text}\n\n{table(args, rows)}")
    (out / "gpu.json").write_text(json.dumps({"machine": text, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
