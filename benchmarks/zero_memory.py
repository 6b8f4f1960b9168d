"""Model-state memory per GPU under DDP and ZeRO stages 1/2/3 for lit_gen recipes (ZeRO paper accounting).

    python benchmarks/zero_memory.py [--recipes recipes/cifar10/teacher.yaml recipes/cifar10/fdistill_js.yaml]
                                     [--gpus 8]

Rajbhandari et al. 2020 ("ZeRO", Sec. 3.1 and Fig. 1), mixed-precision Adam with Ψ trainable parameters on N GPUs:
    DDP      2Ψ (bf16 params) + 2Ψ (bf16 grads) + 12Ψ (fp32 master, momentum, variance) = 16Ψ bytes per GPU
    stage 1  2Ψ + 2Ψ + 12Ψ/N        stage 2  2Ψ + (2Ψ + 12Ψ)/N        stage 3  (2Ψ + 2Ψ + 12Ψ)/N
lit_gen adds, per GPU: frozen networks (teachers) in the compute dtype, 2 bytes per parameter (partitioned /N at
stage 3, where the engine owns every parameter of the module), and the EMA of the trained network in fp32 (4 bytes,
kept whole on every rank: callbacks.ema.EMA). Activations and temporary buffers are not included (they depend on
batch size and checkpointing; measure them on a GPU). The networks are built from the recipes (distillation recipes
get an untrained teacher built from the dataset's teacher recipe), so the counts are the recipes' real ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

GIB = 1024**3


def build_module(recipe: Path, workdir: Path) -> torch.nn.Module:
    from lit_gen.cli import lightning_cli
    from lit_gen.data.shards import write_shards

    dataset = recipe.parent.name
    shapes = {"cifar10": (32, 3, 10), "imagenet64": (64, 3, 1000), "digits": None, "toy2d": None}
    data = workdir / f"{dataset}_data"
    if not data.exists():
        if shapes.get(dataset) is None:
            write_shards("builtin:digits" if dataset == "digits" else "builtin:toy2d:gmm8", data)
        else:
            size, channels, classes = shapes[dataset]
            images = np.zeros((2, size, size, channels), dtype=np.uint8)
            np.savez(workdir / f"{dataset}.npz", x=images, y=np.array([0, classes - 1]))
            write_shards(str(workdir / f"{dataset}.npz"), data)
    args = ["-c", str(recipe), "--data.init_args.shards", str(data), "--trainer.accelerator", "cpu"]
    args += ["--trainer.devices", "1", "--trainer.precision", "32-true", "--trainer.default_root_dir", str(workdir)]
    model = yaml.safe_load(recipe.read_text())["model"]
    if "teacher" in (model.get("init_args") or {}):
        teacher = workdir / f"{dataset}_teacher.ckpt"
        if not teacher.exists():
            cli = lightning_cli(
                ["-c", str(recipe.parent / "teacher.yaml"), *args[2:]], run=False
            )  # the dataset's teacher recipe
            cli.model.attach_data(cli.datamodule.info)
            torch.save({"state_dict": cli.model.state_dict(), "lit_gen": cli.model.describe()}, teacher)
        args += ["--model.init_args.teacher", str(teacher)]
    return lightning_cli(args, run=False).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipes", nargs="+", default=["recipes/cifar10/teacher.yaml", "recipes/cifar10/fdistill_js.yaml"]
    )
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    n = args.gpus
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in map(Path, args.recipes):
            if not recipe.is_file():
                print(f"skipping {recipe}: not found")
                continue
            module = build_module(recipe, Path(tmp))
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            # A method-owned EMA copy (net_ema, e.g. TRACT / f-distill) is counted once, as the fp32 EMA below.
            frozen = sum(
                p.numel() for name, p in module.named_parameters() if not p.requires_grad and "_ema." not in name
            )
            ema = sum(p.numel() for p in module.net.parameters())
            t, f = trainable, frozen
            stages = {
                "DDP": 16 * t + 2 * f,
                "ZeRO-1": 4 * t + 12 * t / n + 2 * f,
                "ZeRO-2": 2 * t + 14 * t / n + 2 * f,
                "ZeRO-3": 16 * t / n + 2 * f / n,
            }
            rows.append((recipe, t, f, ema, {k: v + 4 * ema for k, v in stages.items()}))
    print("| recipe | trainable Ψ | frozen | EMA | " + " | ".join(f"{k} GiB/GPU (N={n})" for k in rows[0][4]) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in rows[0][4]) + " |")
    for recipe, t, f, ema, stages in rows:
        cells = " | ".join(f"{v / GIB:.2f}" for v in stages.values())
        print(f"| {recipe} | {t / 1e6:.1f}M | {f / 1e6:.1f}M | {ema / 1e6:.1f}M | {cells} |")
    print(f"\nbytes per trainable parameter (excluding frozen/EMA), N={n}: DDP 16, ZeRO-1 {4 + 12 / n:.2f}, "
          f"ZeRO-2 {2 + 14 / n:.2f}, ZeRO-3 {16 / n:.2f}; frozen 2 (ZeRO-3: {2 / n:.2f}); EMA 4")  # fmt: skip


if __name__ == "__main__":
    main()
