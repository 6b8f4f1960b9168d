"""Import time, peak memory and conformance of full-size public teacher architectures (random weights).

    python benchmarks/import_teachers.py [--out runs/bench/import]

1. EDM CIFAR-10 (class-conditional DDPM++, ``edm-cifar10-32x32-cond-vp``'s architecture, 55.7M parameters): a lit_gen
   UNet with EDM's arguments and random weights is written as an EDM network-snapshot pickle in the persistence
   format (tests/test_import_edm.py's writer), imported by `lit-gen import` in a subprocess (wall time and peak RSS),
   and D(x, σ) of the imported teacher is compared with the original network's.
2. google/ddpm-cifar10-32's architecture (diffusers UNet2DModel, 35.7M parameters, DDPMScheduler linear ε): saved
   with save_pretrained, imported with --check in a subprocess; the conformance report is printed.
3. DiT-XL/2 256x256 (facebookresearch DiT .pt layout, 675M parameters, learned σ, 1000 classes) + the Stable
   Diffusion VAE architecture (AutoencoderKL, 83.7M): imported with --format dit --arch DiT-XL/2 --vae (no --check:
   its 16-sample grid would take many CPU minutes), wall time and peak RSS.
4. A tiny latent pipeline (tests/test_import_latents.py: AutoencoderKL + DiTTransformer2DModel): import --check, and
   `lit-gen shards builtin:digits --image-size 16 --encode` of 1797 images.
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


def dit_xl2(out: Path) -> None:
    import diffusers

    from tests.test_import_dit import dit_state_dict

    torch.manual_seed(0)
    state = dit_state_dict(hidden=1152, depth=28, patch=2, side=32, classes=1000)
    n_params = sum(v.numel() for k, v in state.items() if k != "pos_embed")
    torch.save(state, out / "DiT-XL-2-256x256.pt")
    del state
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
    )  # fmt: skip
    vae.save_pretrained(out / "sd-vae")
    vae_params = sum(p.numel() for p in vae.parameters())
    del vae
    target = out / "dit_xl2_256.safetensors"
    wall, rss, text = timed_import(
        str(out / "DiT-XL-2-256x256.pt"), "--arch", "DiT-XL/2", "--vae", str(out / "sd-vae"), "--out", str(target)
    )
    print(
        f"DiT-XL/2 .pt ({n_params / 1e6:.1f}M parameters) + SD-VAE architecture ({vae_params / 1e6:.1f}M): import "
        f"{wall:.1f} s, peak RSS {rss:.0f} MiB, file {target.stat().st_size / 2**20:.0f} MiB; {text.strip()}"
    )
    # Fidelity at full size: the imported network against DiT's forward pass written from its equations
    # (tests/test_import_dit.py), float32, 2 latents at 4 timesteps, labels including the null class.
    from lit_gen.export import load_model
    from tests.test_import_dit import dit_forward

    state = torch.load(out / "DiT-XL-2-256x256.pt", weights_only=True)
    model = load_model(target)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=gen)
    worst = 0.0
    with torch.no_grad():
        for t, y in ((0.0, 0), (250.0, 207), (600.0, 999), (999.0, 1000)):
            tt, yy = torch.full((2,), t), torch.full((2,), y)
            ref = dit_forward(state, x, tt, yy, heads=16)[:, :4]
            worst = max(worst, float((model.net(x, tt, yy) - ref).abs().max()))
            scale = float(ref.abs().max())
    print(f"DiT-XL/2 imported vs DiT's equations, fp32: max |Δε̂| = {worst:.2e} (|ε̂| up to {scale:.1f})")


def latent_pipeline(out: Path) -> None:
    from tests.test_import_latents import make_latent_pipeline

    folder = make_latent_pipeline(out / "tiny-latent-pipeline")
    wall, rss, text = timed_import(str(folder), "--out", str(out / "tiny_latent.safetensors"), "--check")
    report = json.loads((out / "tiny_latent.safetensors.check.json").read_text())
    print(f"tiny latent pipeline: import + --check {wall:.1f} s, peak RSS {rss:.0f} MiB")
    print(json.dumps(report))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lit_gen.cli", "shards", "builtin:digits", "--image-size", "16", "--encode",
         str(out / "tiny_latent.safetensors"), "--out", str(out / "digits_latents"), "--no-progress"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr)
    print(f"shards --encode (1797 digits at 16x16 -> 4x8x8 latents): {time.perf_counter() - start:.1f} s wall "
          f"(process start included); {proc.stdout.strip()}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/import")
    parser.add_argument("--only", choices=("edm", "ddpm", "dit", "latent"), default=None)
    ns = parser.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.only in (None, "edm"):
        edm(out)
    if ns.only in (None, "ddpm"):
        ddpm(out)
    if ns.only in (None, "latent"):
        latent_pipeline(out)
    if ns.only in (None, "dit"):
        dit_xl2(out)


if __name__ == "__main__":
    main()
