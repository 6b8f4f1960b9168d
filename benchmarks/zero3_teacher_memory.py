"""Bytes per rank of a frozen teacher under ZeRO-3: ``teacher_zero3: partition`` vs ``replicate`` (issue 20).

Measured, not computed: 2 CPU processes over gloo (DS_ACCELERATOR=cpu) build the cifar10 recipe's UNet (55.7M
parameters) as a frozen teacher next to a small trainable layer, hand the module to ``deepspeed.initialize`` with ZeRO
stage 3 (persistence threshold 0), and sum the storage each rank holds: the partitions ``p.ds_tensor`` (partition) or
the whole parameters of a copy kept outside the engine (replicate, what ``DistillationMethod.replicate_frozen`` does).
fp32 storage here; bf16 is half. Run: ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/zero3_teacher_memory.py``
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

UNET = dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
            attn_resolutions=[16], dropout=0.13, num_classes=10, adaptive_scale=False)  # fmt: skip


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    import deepspeed

    from lit_gen.nets import UNet

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    teacher = UNet(**UNET).requires_grad_(False)
    module = nn.Module()
    module.teacher_net, module.student_head = teacher, nn.Linear(8, 8)
    replicated = storage_bytes(list(teacher.parameters()))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
              "stage3_param_persistence_threshold": 0}, "zero_allow_untested_optimizer": True}  # fmt: skip
    optimizer = torch.optim.AdamW(module.student_head.parameters(), lr=1e-3)
    deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    partitioned = storage_bytes([p.ds_tensor for p in teacher.parameters()])
    gathered_max = max(p.ds_numel for p in teacher.parameters()) * 4  # the largest single parameter, gathered
    row = (rank, sum(p.ds_numel for p in teacher.parameters()), partitioned, replicated, gathered_max)
    out[rank] = row
    dist.barrier()


def main() -> None:
    if os.environ.get("DS_ACCELERATOR") != "cpu":
        sys.exit("set DS_ACCELERATOR=cpu (DeepSpeed's CPU accelerator, gloo)")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(world, port, out), nprocs=world)
        rows = [out[r] for r in range(world)]
    print("| rank | teacher parameters | partition (fp32 bytes) | replicate (fp32 bytes) | largest gathered param |")
    print("|---|---|---|---|---|")
    for rank, numel, part, rep, big in rows:
        print(f"| {rank} | {numel:,} | {part:,} ({part / 2**20:.1f} MiB) | {rep:,} ({rep / 2**20:.1f} MiB) | "
              f"{big / 2**20:.2f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
