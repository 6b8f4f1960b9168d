"""Import time, peak memory and fidelity of a full-size EDM2-S ImageNet-512 snapshot (random weights; issue 17).

    OMP_NUM_THREADS=1 python benchmarks/import_edm2.py [--out runs/bench/import_edm2]

The snapshot is written by tests/test_import_edm2.py's writer in EDM2's persistence format with EDM2-S's architecture
(``edm2-img512-s``: model_channels 192, channel_mult [1, 2, 3, 4], 3 blocks, attention at 16 and 8, 64x64x4 SD-VAE
latents, 1000 classes, float16 tensors, force-normalised random weights) and a StabilityVAEEncoder record; the VAE is
the Stable Diffusion AutoencoderKL architecture (random weights). `lit-gen import --format edm2 --vae` runs in a
fresh process (wall time, peak RSS); then, in this process, the weights read back are compared with the pickle's and
the imported denoiser with EDM2's forward pass written from its equations (the test's reference), float32, one latent
at σ = 0.05 / 1 / 20 with a class label and with none. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EDM2_S = dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
              channels_per_head=64, dropout=0.0)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/import_edm2")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    import diffusers

    import tests.test_import_edm as edm_fmt
    import tests.test_import_edm2 as fmt

    persistence = types.ModuleType("torch_utils.persistence")
    edm_fmt._reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    persistence._reconstruct_persistent_obj = edm_fmt._reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    fmt.EasyDict.__module__ = "dnnlib.util"
    util.EasyDict = fmt.EasyDict
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util})  # fmt: skip

    src = out / "edm2-img512-s-2147483-0.130.pkl"
    precond = fmt.edm2_precond(1000, 4, seed=0, arch=EDM2_S, res=64, logvar=128)
    n_elements = sum(v.numel() for v in precond.state_dict().values())
    fmt.write_snapshot(src, precond, latent=True)
    del precond
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
    )  # fmt: skip
    vae.save_pretrained(out / "sd-vae-ft-mse")
    del vae
    target = out / "edm2_img512_s.safetensors"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "from lit_gen.cli import main; main()", "import", str(src), "--format", "edm2",
         "--vae", str(out / "sd-vae-ft-mse"), "--out", str(target)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"EDM2-S ImageNet-512 snapshot ({n_elements / 1e6:.1f}M tensor elements, pickle "
        f"{src.stat().st_size / 2**20:.0f} MiB) + SD-VAE architecture: import {wall:.1f} s, peak RSS {rss:.0f} MiB, "
        f"file {target.stat().st_size / 2**20:.0f} MiB; {proc.stdout.strip()}"
    )

    from lit_gen.export import load_model
    from lit_gen.importers.edm_pickle import flat_state_dict, map_edm2_weights, read_edm_pickle

    start = time.perf_counter()
    top = read_edm_pickle(src, "EDM2")
    read_s = time.perf_counter() - start
    model = load_model(target)
    state = model.net.state_dict()
    mapped = map_edm2_weights(top["ema"])
    exact = all(torch.equal(state[k], v) for k, v in mapped.items())
    print(f"restricted unpickling alone: {read_s:.1f} s; {len(mapped)} tensors read back bit-exact: {exact}")
    sd = {k: v.float() for k, v in flat_state_dict(top["ema"]).items()}  # the pickle's float16 tensors
    del top, mapped
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 64, 64, generator=gen) * 0.5
    noise = torch.randn(1, 4, 64, 64, generator=gen)
    worst, scale = 0.0, 0.0
    onehot = torch.zeros(1, 1000)
    onehot[0, 207] = 1.0
    with torch.no_grad():
        for sigma in (0.05, 1.0, 20.0):
            s = torch.full((1,), sigma)
            x = x0 + sigma * noise
            for label, vec in ((torch.tensor([207]), onehot), (None, None)):
                t0 = time.perf_counter()
                ref = fmt.edm2_denoiser(sd, 1000, x, s, vec, EDM2_S)
                t1 = time.perf_counter()
                mine = model.denoiser()(x, s, label)
                t2 = time.perf_counter()
                worst = max(worst, float((mine - ref).abs().max()))
                scale = max(scale, float(ref.abs().max()))
    print(
        f"EDM2-S imported vs EDM2's equations, fp32, 6 evaluations: max |ΔD| = {worst:.2e} (|D| up to {scale:.1f}); "
        f"one forward: reference {t1 - t0:.1f} s, lit_gen {t2 - t1:.1f} s (1 thread)"
    )


if __name__ == "__main__":
    main()
