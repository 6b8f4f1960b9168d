"""Where a w-conditioned f-distill student stands per guidance weight (issue 18): prints, for the generator's own
samples at each w and noise level σ, the RMS of

- the fake score's response to w:      D_φ(x_σ; w_hi) − D_φ(x_σ; w_lo)
- the guided teacher's response to w:  D^w_hi(x_σ) − D^w_lo(x_σ)  (CFG x̂_∅ + w (x̂_c − x̂_∅), or autoguidance)
- the DM term's residual at that w:    D_φ(x_σ; w) − D^w(x_σ)  (the generator's gradient, DMD eq. 7 / f-distill)

(data units; digits are in [−1, 1]). A residual that stays large at one w after training means the generator cannot
reach the target there: a guided x̂ that no distribution's denoiser produces (CFG extrapolates the class means at
large σ) keeps pushing the samples.

    python benchmarks/fdistill_wcond_diagnose.py runs/wcond/fdistill_cfg/checkpoints/last.ckpt [--w 1 4] [--n 500]
"""

from __future__ import annotations

import argparse

import torch

from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.methods.fdistill import FDistill


def rms(a: torch.Tensor) -> float:
    return a.pow(2).mean().sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a w-conditioned f-distill checkpoint (.ckpt)")
    parser.add_argument("--w", type=float, nargs=2, default=[1.0, 4.0], help="the low and high guidance weights")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.2, 1.0, 5.0, 20.0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ckpt = torch.load(args.ckpt, weights_only=True, map_location="cpu")
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_") and k != "optimizer"}
    method = FDistill(**hparams)
    method.load_state_dict(ckpt["state_dict"], strict=False)
    method.eval()
    num_classes = getattr(method.net, "num_classes", 0) or 0
    shape = method.teacher_description["data"]["shape"]
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n, *shape, generator=gen)
    label = torch.arange(args.n) % num_classes if num_classes else None
    w_lo, w_hi = args.w
    full = lambda w: torch.full((args.n,), float(w))  # noqa: E731

    print(f"{args.ckpt}: guidance range {method.guidance_range}, divergence {method.divergence.name}")
    print("| generator w | σ | fake: w_hi − w_lo | teacher: w_hi − w_lo | DM residual fake − teacher at w |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for w in (w_lo, w_hi):
            x0 = method.generate(z, label, full(w))
            for s in args.sigma:
                sigma = torch.full((args.n,), s)
                x_t = x0 + s * torch.randn(x0.shape, generator=gen)
                fake = {v: method.param.denoise(bind_guidance(method.fake_net, full(v)), x_t, sigma, label)
                        for v in (w_lo, w_hi)}  # fmt: skip
                teacher = {v: method.teacher_denoise(x_t, sigma, label, full(v)) for v in (w_lo, w_hi)}
                print(
                    f"| {w:g} | {s:g} | {rms(fake[w_hi] - fake[w_lo]):.3f} | {rms(teacher[w_hi] - teacher[w_lo]):.3f}"
                    f" | {rms(fake[w] - teacher[w]):.3f} |"
                )
        change = rms(method.generate(z, label, full(w_hi)) - method.generate(z, label, full(w_lo)))
    print(f"generator samples, w_hi vs w_lo: RMS change {change:.3f}")


if __name__ == "__main__":
    main()
