"""Model-state memory per rank, measured: method (teacher, TRACT, CD, f-distill) × engine (DDP, ZeRO-1, ZeRO-2, LoRA;
ZeRO-3 / FSDP with ``--engines``) for the recipes/cifar10 networks, on 2 CPU processes (gloo), without torch.cuda.

    python benchmarks/memory_table.py [--methods teacher tract cd fdistill] [--engines ddp zero1 zero2 lora]
                                      [--steps 2] [--json OUT.json]

Every cell is one real ``lit-gen fit`` of the recipe (its network, optimizer and callbacks; precision forced to
32-true because these are CPU processes; batch 2 per rank; ``--steps`` optimizer steps) with the engine's overlay,
launched by Lightning on 2 processes (DeepSpeed through ``lit_gen.scale.deepspeed_cpu.DeepSpeedCPUStrategy`` with
``DS_ACCELERATOR=cpu``). A callback counts, on each rank, the bytes of the live tensors by storage
(``untyped_storage().data_ptr()``, each storage once, so shared / flattened / partitioned storage counts right):

- params: the module's parameters and buffers (trained nets, frozen teacher, method-owned EMA / target copies) and
  the tensors callbacks hold (callbacks.ema.EMA's averaged copy);
- grads: ``p.grad`` of every parameter plus the gradient buffers of a DeepSpeed ZeRO optimizer (its attributes
  named ``*grad*``: averaged / partitioned gradients, the contiguous-gradient and IPG buffers), taken just before
  the optimizer step (``on_before_optimizer_step``, their peak);
- optimizer: the torch optimizer's state (Adam moments, step) and everything else a ZeRO optimizer holds (its fp32
  master partitions), after the step.

Each storage is charged to the first of these that reaches it. Not visible from Python and so not counted: DDP's
reducer buckets (under DDP one more gradient-sized buffer), communication buffers, activations. The "paper" columns
are the ZeRO accounting (Rajbhandari et al. 2020, Sec. 3.1) of ``benchmarks/zero_memory.py`` for the same Ψ
(trainable) and frozen counts at N = 2: "fp32" is that accounting for this fp32 run (4 B weights, 4 B grads, 8 B
Adam moments, plus DeepSpeed's own 4 B fp32 master partition under ZeRO), "bf16" the mixed-precision GPU setting
zero_memory.py prints (2 B weights/grads, 12 B fp32 optimizer state; frozen nets 2 B; EMA 4 B).

An engine whose overlay is not in this checkout is skipped with the reason; a cell that fails prints the run's last
error line (e.g. a method that refuses ZeRO-3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1024**2
METHODS = {
    "teacher": "recipes/cifar10/teacher.yaml",
    "tract": "recipes/cifar10/tract.yaml",
    "cd": "recipes/cifar10/cd.yaml",
    "fdistill": "recipes/cifar10/fdistill_js.yaml",
}
DS_CPU = ["-c", "recipes/scale/deepspeed_cpu.yaml"]
# Engine table: name -> (extra lit-gen fit arguments, files it needs, the ZeRO stage its paper accounting follows,
# whether it only applies to students). New engines (ZeRO-3, FSDP) are one row each.
ENGINES: dict[str, dict[str, Any]] = {
    "ddp": {"args": ["--trainer.strategy", "ddp"], "needs": [], "stage": 0},
    "zero1": {"args": [*DS_CPU, "--trainer.strategy.init_args.stage", "1"], "needs": [DS_CPU[1]], "stage": 1},
    "zero2": {"args": [*DS_CPU, "--trainer.strategy.init_args.stage", "2"], "needs": [DS_CPU[1]], "stage": 2},
    "lora": {
        "args": ["--trainer.strategy", "ddp", "--model.init_args.lora", "{rank: 8}"],
        "needs": [],
        "stage": 0,
        "students_only": True,
    },
    "zero3": {
        "args": ["-c", "recipes/scale/deepspeed_cpu_stage3.yaml"],
        "needs": ["recipes/scale/deepspeed_cpu_stage3.yaml"],
        "stage": 3,
    },
    "fsdp": {
        "args": ["-c", "recipes/scale/fsdp_cpu.yaml"],
        "needs": ["recipes/scale/fsdp_cpu.yaml"],
        "stage": 3,
    },
}
DEFAULT_ENGINES = ("ddp", "zero1", "zero2", "lora")


def engine_unavailable(name: str) -> str | None:
    """Why an engine cannot run from this checkout (None = it can)."""
    if name not in ENGINES:
        return f"unknown engine (known: {', '.join(ENGINES)})"
    missing = [f for f in ENGINES[name]["needs"] if not (REPO / f).is_file()]
    return f"{', '.join(missing)} is not in this checkout" if missing else None


# ------------------------------------------------------------------------------------------------ counting
def _tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    """Tensors reachable from ``obj`` through dicts (values), lists, tuples, modules and optimizers."""
    import torch

    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        yield from _tensors(obj.state, depth + 1)
        yield from _tensors([g["params"] for g in obj.param_groups], depth + 1)


def _partitions(params: Any) -> Iterator[Any]:
    """The local shards of ZeRO-3-partitioned parameters (DeepSpeed keeps them in ``param.ds_tensor``; the parameter
    itself is an empty placeholder outside a gather)."""
    src = params.parameters() if hasattr(params, "parameters") else params
    return (p.ds_tensor for p in src if getattr(p, "ds_tensor", None) is not None)


def _numel(p: Any) -> int:
    """A parameter's full element count (ZeRO-3: ``ds_numel``, the placeholder's numel is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


class Ledger:
    """Bytes per category, each storage charged once, to the first category that reaches it."""

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}
        self.size: dict[int, int] = {}

    def charge(self, tensors: Any, category: str) -> None:
        for t in tensors:
            t = getattr(t, "_local_tensor", t)  # FSDP2's DTensor parameters: this rank's shard
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.owner:
                self.owner[ptr], self.size[ptr] = category, storage.nbytes()

    def total(self, category: str) -> int:
        return sum(s for p, s in self.size.items() if self.owner[p] == category)


def measure_callback(out: Path) -> Any:
    """A Lightning callback that writes this rank's peak params / grads / optimizer bytes to ``out/rank{r}.json``."""
    import lightning as L

    class MeasureModelState(L.Callback):
        def __init__(self) -> None:
            self.peak = {"params": 0, "grads": 0, "optimizer": 0}

        def _ledger(self, trainer: Any, module: Any, grads: bool) -> Ledger:
            ledger = Ledger()
            ledger.charge(_tensors(module), "params")
            ledger.charge(_partitions(module), "params")  # ZeRO-3: a parameter's local shard lives in ds_tensor
            for cb in trainer.callbacks:
                if cb is not self:
                    ledger.charge(_tensors(dict(vars(cb))), "params")
            ledger.charge((p.grad for p in module.parameters() if p.grad is not None), "grads")
            for opt in trainer.optimizers:
                inner = getattr(opt, "optimizer", None)
                if isinstance(getattr(opt, "__dict__", None), dict) and inner is not None:  # a DeepSpeed ZeRO optimizer
                    attrs = dict(vars(opt))
                    ledger.charge(_tensors({k: v for k, v in attrs.items() if "grad" in k}), "grads")
                    ledger.charge(_tensors({k: v for k, v in attrs.items() if "grad" not in k}), "optimizer")
                else:
                    ledger.charge(_tensors(opt), "optimizer")
            return ledger

        def _update(self, ledger: Ledger, *categories: str) -> None:
            for c in categories:
                self.peak[c] = max(self.peak[c], ledger.total(c))

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self._update(self._ledger(trainer, pl_module, grads=True), "params", "grads")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self._update(self._ledger(trainer, pl_module, grads=False), "params", "optimizer")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            trainable = [p for p in pl_module.parameters() if p.requires_grad]
            ledger = Ledger()
            ledger.charge(trainable, "t")
            ledger.charge(_partitions(trainable), "t")
            ledger.charge(pl_module.parameters(), "f")
            ledger.charge(_partitions(pl_module.parameters()), "f")
            counts = {"trainable_numel": sum(_numel(p) for p in trainable), "trainable_bytes": ledger.total("t")}
            counts["frozen_bytes"] = ledger.total("f")
            counts["net_numel"] = sum(_numel(p) for p in pl_module.net.parameters())  # what an EMA callback copies
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({**self.peak, **counts}))

    return MeasureModelState()


# ------------------------------------------------------------------------------------------------ one cell
def run_cell(method: str, engine: str, workdir: Path, steps: int, out: Path) -> None:
    """Inside the launched processes: build the recipe's CLI objects, keep the EMA callbacks, fit ``steps`` steps."""
    from lit_gen.cli import lightning_cli

    args = ["-c", str(REPO / METHODS[method]), *ENGINES[engine]["args"]]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
    args += ["--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(workdir / f"{method}_{engine}")]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    args += ["--data.init_args.shards", str(workdir / "data"), "--data.init_args.batch_size", "2"]
    args += ["--data.init_args.num_workers", "0"]
    if method != "teacher":
        args += ["--model.init_args.teacher", str(workdir / "teacher.ckpt")]
    cli = lightning_cli(args, run=False)
    # Checkpoints, sample grids and the lr monitor are not model state; an EMA callback's averaged copy is.
    keep = [cb for cb in cli.trainer.callbacks if "EMA" in type(cb).__name__ or "Averag" in type(cb).__name__]
    cli.trainer.callbacks[:] = keep
    cli.trainer.callbacks.append(measure_callback(out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def prepare(workdir: Path) -> None:
    """Shards of 64 random CIFAR-shaped images (10 classes) and an untrained teacher from the cifar10 teacher recipe."""
    import numpy as np
    import torch

    from lit_gen.cli import lightning_cli
    from lit_gen.data.shards import write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    np.savez(workdir / "cifar.npz", x=images, y=np.arange(64) % 10)
    write_shards(str(workdir / "cifar.npz"), workdir / "data")
    cli = lightning_cli(
        ["-c", str(REPO / METHODS["teacher"]), "--data.init_args.shards", str(workdir / "data"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
         "--trainer.default_root_dir", str(workdir / "teacher_run"), "--trainer.logger", "false"],
        run=False,
    )  # fmt: skip
    cli.model.attach_data(cli.datamodule.info)
    torch.save({"state_dict": cli.model.state_dict(), "lit_gen": cli.model.describe()}, workdir / "teacher.ckpt")


def paper(stage: int, trainable: int, frozen_bytes: int, n: int, ema_numel: int) -> tuple[float, float]:
    """(fp32, bf16) ZeRO accounting in bytes per rank (``benchmarks/zero_memory.py``'s rule for bf16)."""
    t, frozen = trainable, frozen_bytes / 4
    fp32 = {0: 16 * t, 1: 8 * t + 12 * t / n, 2: 4 * t + 16 * t / n, 3: 20 * t / n}[stage]
    bf16 = {0: 16 * t, 1: 4 * t + 12 * t / n, 2: 2 * t + 14 * t / n, 3: 16 * t / n}[stage]
    fp32 += 4 * frozen / (n if stage == 3 else 1) + 4 * ema_numel
    bf16 += 2 * frozen / (n if stage == 3 else 1) + 4 * ema_numel
    return fp32, bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per cell")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (after every cell)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (each is 2 processes)")
    parser.add_argument("--from-json", default=None, help="only print the table of a --json file")
    parser.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)  # METHOD ENGINE (internal)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        run_cell(args.cell[0], args.cell[1], Path(args.workdir), args.steps, Path(args.out))
        return
    if args.from_json:
        _print_table(json.loads(Path(args.from_json).read_text()), [])
        return

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    engines = []
    for engine in args.engines:
        reason = engine_unavailable(engine)
        if reason:
            print(f"skipping engine {engine}: {reason}", flush=True)
            skipped.append(f"{engine}: {reason}")
        else:
            engines.append(engine)
    cells = [(m, e) for e in engines for m in args.methods if not (ENGINES[e].get("students_only") and m == "teacher")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir)
        running: list[tuple[str, str, Path, float, subprocess.Popen]] = []
        for index, (method, engine) in enumerate(cells):
            out = workdir / "measure" / f"{method}_{engine}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", method, engine]
            cmd += ["--workdir", str(workdir), "--out", str(out), "--steps", str(args.steps)]
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
            env["MASTER_PORT"] = str(29600 + index)  # concurrent cells (--jobs) need their own rendezvous port
            log = open(workdir / f"{method}_{engine}.log", "w")  # noqa: SIM115 - closed when the cell is collected
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            running.append((method, engine, out, time.time(), proc))
            while len(running) >= args.jobs or (index == len(cells) - 1 and running):
                running = _collect(running, rows, workdir, args.json)
    _print_table(rows, skipped)


def _collect(running: list, rows: list[dict[str, Any]], workdir: Path, json_path: str | None) -> list:
    """Wait for the first finished cell, turn its per-rank files into a row (or an error row)."""
    while True:
        for item in running:
            method, engine, out, start, proc = item
            if proc.poll() is None:
                continue
            ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))] if out.exists() else []
            if proc.returncode != 0 or len(ranks) != 2:
                lines = [ln for ln in (workdir / f"{method}_{engine}.log").read_text().splitlines() if ln.strip()]
                error = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "?")
                print(f"{method} × {engine}: failed ({error.strip()[:300]})", flush=True)
                rows.append({"method": method, "engine": engine, "error": error.strip()[:300]})
            else:
                r = max(ranks, key=lambda x: x["params"] + x["grads"] + x["optimizer"])  # the fuller rank
                ema_numel = 0 if method in ("tract", "fdistill") else r["trainable_numel"]  # EMA callback's copy
                fp32, bf16 = paper(ENGINES[engine]["stage"], r["trainable_numel"], r["frozen_bytes"], 2, ema_numel)
                row = {"method": method, "engine": engine, "seconds": round(time.time() - start, 1), **r}
                row.update({"paper_fp32": fp32, "paper_bf16": bf16})
                rows.append(row)
                print(f"{method} × {engine}: done in {row['seconds']} s", flush=True)
            if json_path:
                Path(json_path).write_text(json.dumps(rows, indent=1))
            return [other for other in running if other is not item]
        time.sleep(2)


def _print_table(rows: list[dict[str, Any]], skipped: list[str]) -> None:
    print()
    print("| method | engine | trainable Ψ | params MiB | grads MiB | optimizer MiB | total MiB/rank | "
          "paper fp32 MiB | paper bf16 MiB (zero_memory.py) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | {row['engine']} | failed: {row['error']} | | | | | | |")
            continue
        total = row["params"] + row["grads"] + row["optimizer"]
        # callbacks.ema.EMA (teacher and CD recipes) keeps an fp32 copy of the whole net; TRACT/f-distill own theirs
        ema = row.get("net_numel", row["trainable_numel"]) if row["method"] in ("teacher", "cd") else 0
        fp32, bf16 = paper(ENGINES[row["engine"]]["stage"], row["trainable_numel"], row["frozen_bytes"], 2, ema)
        cells = [row["params"], row["grads"], row["optimizer"], total, fp32, bf16]
        print(f"| {row['method']} | {row['engine']} | {row['trainable_numel'] / 1e6:.2f}M | "
              + " | ".join(f"{c / MIB:.0f}" for c in cells) + " |")  # fmt: skip
    for line in skipped:
        print(f"\nskipped {line}")


if __name__ == "__main__":
    main()
