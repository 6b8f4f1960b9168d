"""The exact denoiser and probability-flow ODE of a 2-D Gaussian mixture, for tests that need ideal one-step maps
(ALGORITHMS.md §1.1's Gaussian closed form, mixed: D(x; σ) = Σ_k p(k | x, σ) (μ_k + s_k²/(s_k² + σ²)(x − μ_k)))."""

from __future__ import annotations

import torch

from lit_gen.data.builtin import TOY2D, Mixture2D
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.diffusion.samplers import sample_heun

F64 = torch.float64


def model_space_mixture(name: str = "gmm5_heldout", scale: float = 4.0) -> Mixture2D:
    """A built-in mixture divided by ``scale`` (std ≈ 0.5, as ``lit-gen shards`` normalises points)."""
    mix = TOY2D[name]
    return Mixture2D(
        means=tuple((a / scale, b / scale) for a, b in mix.means),
        stds=tuple(s / scale for s in mix.stds),
        weights=mix.weights,
    )


def exact_denoiser(mix: Mixture2D):
    """D(x; σ, label) of the mixture, float64."""
    means = torch.tensor(mix.means, dtype=F64)
    var0 = torch.tensor(mix.stds, dtype=F64) ** 2
    logw = torch.log(torch.tensor(mix.weights, dtype=F64))

    def denoise(x: torch.Tensor, sigma: torch.Tensor | float, label: torch.Tensor | None = None, **_: object):
        x = x.to(F64)
        s2 = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1).expand(x.shape[0], 1) ** 2
        var = var0[None] + s2  # [B, K]
        d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        post = torch.softmax(logw[None] - d2 / (2 * var) - torch.log(var), dim=1)
        shrunk = means[None] + (var0[None] / var)[..., None] * (x[:, None, :] - means[None])
        return (post[..., None] * shrunk).sum(1)

    return denoise


def ode_to_zero(denoise, x: torch.Tensor, sigma: float, steps: int = 48) -> torch.Tensor:
    """The PF-ODE solution at σ = 0 from (x, σ) in EDM coordinates (Heun on a Karras grid): the ideal consistency
    function in EDM coordinates."""
    with torch.no_grad():
        return sample_heun(denoise, x.to(F64), karras_sigmas(steps, 0.002, sigma, 7.0, dtype=F64))
