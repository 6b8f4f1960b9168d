"""Bytes per rank of parameters, gradients, optimizer state and EMA under FSDP (lit_gen.scale.fsdp) vs DDP.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py [--recipes recipes/cifar10/teacher.yaml ...] [--ranks 2]

Measured without ``torch.cuda``: ``--ranks`` CPU processes over gloo build the recipe's real module (as
benchmarks/zero_memory.py does: distillation recipes get an untrained teacher of the dataset's teacher recipe),
shard it with the FSDP strategy's own plan (``lit_gen.scale.fsdp.apply_sharding``; frozen teacher in bf16, as under
bf16-mixed), give every trainable parameter a gradient and take one AdamW step (lr 0), and count the bytes of the
tensors each rank holds (local shards of DTensors, whole plain tensors: ``state_bytes_per_rank``). The teacher
recipe's EMA is the EMA callback's fp32 copy of ``net`` (sharded like ``net``); f-distill's is its own ``net_ema``
(counted with the frozen modules). DDP holds every tensor whole on every rank, so its column is the same count on the
unsharded module (teacher in fp32: lit_gen's DDP path does not cast it). Activations are not included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
MIB = 1024**2


def _count(module: torch.nn.Module, ema_target: str | None) -> dict[str, int]:
    """DDP: every tensor whole (params fp32, grads and AdamW's two moments for the trainable ones, EMA fp32)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    ema = sum(p.numel() for p in getattr(module, ema_target).parameters()) * 4 if ema_target else 0
    return {"params": 4 * trainable, "frozen_params": frozen, "grads": 4 * trainable, "optimizer": 8 * trainable,
            "ema": ema}  # fmt: skip


def _rank(rank: int, world: int, port: int, recipe: str, workdir: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from zero_memory import build_module

    from lit_gen.scale.fsdp import apply_sharding, state_bytes_per_rank

    torch.manual_seed(0)
    module = build_module(Path(recipe), Path(workdir))
    ema_target = "net" if getattr(module, "method_name", "") == "teacher" else None
    ddp = _count(module, ema_target)
    apply_sharding(module, init_device_mesh("cpu", (world,)), frozen_dtype=torch.bfloat16)
    params = module.trainable_parameters()
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(params, lr=0.0)
    optimizer.step()
    fsdp = state_bytes_per_rank(module, optimizer)
    shadow = (
        [p.detach().to(torch.float32, copy=True) for p in getattr(module, ema_target).parameters()]
        if ema_target
        else []
    )
    fsdp["ema"] = sum(t.to_local().numel() * 4 if hasattr(t, "to_local") else t.numel() * 4 for t in shadow)
    out[rank] = {"fsdp": fsdp, "ddp": ddp}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipes", nargs="+", default=["recipes/cifar10/teacher.yaml", "recipes/cifar10/fdistill_js.yaml"]
    )
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    import socket

    import torch.multiprocessing as mp
    from zero_memory import build_module

    print(
        f"| recipe | engine (N={args.ranks}) | params MiB | frozen MiB | grads MiB | optimizer MiB | EMA MiB "
        "| total MiB/rank |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            build_module(Path(recipe), Path(tmp))  # writes the shards / teacher once, before the ranks read them
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = mp.Manager().dict()
            mp.spawn(_rank, args=(args.ranks, port, recipe, tmp, out), nprocs=args.ranks)
            for engine in ("ddp", "fsdp"):
                row = out[0][engine]
                worst = max(sum(out[r][engine].values()) for r in range(args.ranks))
                cells = " | ".join(
                    f"{row[k] / MIB:.1f}" for k in ("params", "frozen_params", "grads", "optimizer", "ema")
                )
                print(f"| {recipe} | {engine.upper()} | {cells} | {worst / MIB:.1f} |")


if __name__ == "__main__":
    main()
