"""Import time, peak memory and conformance of full-size public teacher architectures (random weights).

    python benchmarks/import_teachers.py [--out runs/bench/import]

1. EDM CIFAR-10 (class-conditional DDPM++, ``edm-cifar10-32x32-cond-vp``'s architecture, 55.7M parameters): a lit_gen
   UNet with EDM's arguments and random weights is written as an EDM network-snapshot pickle in the persistence
   format (tests/test_import_edm.py's writer), imported by `lit-gen import` in a subprocess (wall time and peak RSS),
   and D(x, σ) of the imported teacher is compared with the original network's.
2. google/ddpm-cifar10-32's architecture (diffusers UNet2DModel, 35.7M parameters, DDPMScheduler linear ε): saved
   with save_pretrained, imported with --check in a subprocess; the conformance report is printed.
Nothing is downloaded. Set OMP_NUM_THREADS=1 on shared machines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EDM_CIFAR = dict(
    img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
    attn_resolutions=[16], dropout=0.13, embedding_type="positional", channel_mult_emb=4, adaptive_scale=False,
)  # fmt: skip


def timed_import(*args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB of the child, stdout) of `lit-gen import ARGS` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lit_gen.cli", "import", *args], capture_output=True, text=True, cwd=REPO
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, proc.stdout


def edm(out: Path) -> None:
    import types

    import tests.test_import_edm as fmt
    from lit_gen.diffusion.edm import EDM
    from lit_gen.export import load_model
    from lit_gen.nets.unet import UNet

    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    fmt._reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    module._reconstruct_persistent_obj = fmt._reconstruct_persistent_obj
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": module})
    torch.manual_seed(0)
    net = UNet(**EDM_CIFAR, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net.eval()
    snap = out / "network-snapshot-edm-cifar10-cond.pkl"
    fmt.edm_snapshot(snap, net, 10, arch=EDM_CIFAR)
    wall, rss, _ = timed_import(str(snap), "--out", str(out / "edm_cifar10.safetensors"))
    model = load_model(out / "edm_cifar10.safetensors")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 7, 9])
    worst = 0.0
    with torch.no_grad():
        for sigma in (0.002, 0.5, 5.0, 80.0):
            s = torch.full((4,), sigma)
            d_ref = EDM().denoise(net, x * max(sigma, 1), s, labels)
            worst = max(worst, float((model.denoiser()(x * max(sigma, 1), s, labels) - d_ref).abs().max()))
    params = sum(p.numel() for p in model.net.parameters())
    print(
        f"EDM CIFAR-10 cond DDPM++: {params / 1e6:.2f}M parameters, pickle {snap.stat().st_size / 2**20:.0f} MiB, "
        f"import {wall:.1f} s wall (process start included), peak RSS {rss:.0f} MiB, "
        f"max |D_imported - D_original| fp32 = {worst:.2e}"
    )


def ddpm(out: Path) -> None:
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
        attention_head_dim=None, resnet_time_scale_shift="default", norm_eps=1e-6,
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = out / "ddpm-cifar10-32"
    model.save_pretrained(folder)
    diffusers.DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000).save_pretrained(folder)
    wall, rss, text = timed_import(str(folder), "--out", str(out / "ddpm_cifar10.safetensors"), "--check")
    report = json.loads((out / "ddpm_cifar10.safetensors.check.json").read_text())
    print(
        f"diffusers UNet2DModel (ddpm-cifar10-32 architecture): import + --check {wall:.1f} s, peak RSS {rss:.0f} MiB"
    )
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/import")
    parser.add_argument("--only", choices=("edm", "ddpm"), default=None)
    ns = parser.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.only in (None, "edm"):
        edm(out)
    if ns.only in (None, "ddpm"):
        ddpm(out)


if __name__ == "__main__":
    main()
