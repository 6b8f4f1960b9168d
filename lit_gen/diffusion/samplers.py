"""Probability-flow ODE samplers on a denoiser D(x, σ, label) in VE coordinates (x = y + σ n).

The ODE is dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3 with σ(t) = t, s(t) = 1). ``sigmas`` is a
decreasing 1-D grid, normally ending at 0 (``karras_sigmas``); the denoiser receives σ as a tensor of shape [B].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import compute_dtype
from lit_gen.diffusion.consistency import sample_consistency
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.diffusion.meanflow import sample_meanflow
from lit_gen.errors import LitGenError

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``D(x, sigma, label) -> x0_hat``: x [B, ...], sigma [B], label LongTensor [B] or None."""


def _grid(sigmas: Tensor | list[float]) -> list[float]:
    values = torch.as_tensor(sigmas).detach()
    if values.ndim != 1 or values.numel() < 2:
        raise LitGenError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(values.shape)}")
    return [float(v) for v in values.cpu().tolist()]


def _at(x: Tensor, sigma: float) -> Tensor:
    """σ as the per-sample tensor [B] that denoisers take (float32 at least, whatever x's precision)."""
    return torch.full((x.shape[0],), sigma, device=x.device, dtype=compute_dtype(x))


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, label: Tensor | None = None) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the Heun correction), one NFE per step.

    Written as x_{i+1} = x̂ + (σ_{i+1}/σ_i)(x_i − x̂), which equals x_i + (σ_{i+1} − σ_i)(x_i − x̂)/σ_i and returns
    x̂ exactly when σ_{i+1} = 0.
    """
    grid = _grid(sigmas)
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        x_hat = denoiser(x, _at(x, s), label)
        x = x_hat + (s_next / s) * (x - x_hat)
    return x


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, label: Tensor | None = None) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) on the VE grid ``sigmas``.

    A VP DDIM step z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t, read in the coordinates x = z/α with noise level σ/α, is
    x_s = x̂ + (σ_ve,s/σ_ve,t)(x_t − x̂): exactly the Euler step (Song et al. 2021, Sec. 4.3; Karras et al. 2022,
    Table 1 lists DDIM's solver as Euler; ALGORITHMS.md §1.2). So DDIM here *is* ``sample_euler``; use
    ``VP.sigmas_uniform_t`` for the classic uniform-t DDIM grid.
    """
    return sample_euler(denoiser, x, sigmas, label)


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    label: Tensor | None = None,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's 2nd-order method with optional stochastic churn (Karras et al. 2022, Alg. 2).

    Per step: γ = min(S_churn/N, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax else 0; σ̂ = σ_i(1 + γ);
    x̂ = x + √(σ̂² − σ_i²) S_noise ε; d = (x̂ − D(x̂; σ̂))/σ̂; x' = x̂ + (σ_{i+1} − σ̂) d, corrected with the slope
    at x' unless σ_{i+1} = 0 (that last step is Euler). NFE = 2N − 1 on a grid ending at 0. With s_churn = 0 (the
    default) it is deterministic; otherwise the churn noise is drawn with ``generator``.
    """
    grid = _grid(sigmas)
    n_steps = len(grid) - 1
    gamma_max = min(s_churn / n_steps, math.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        gamma = gamma_max if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1.0 + gamma)
        if gamma > 0:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * noise
        d = (x - denoiser(x, _at(x, s_hat), label)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, _at(x, s_next), label)) / s_next
            x_next = x + (s_next - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the sampler table: the function, its NFE for ``steps`` steps on a grid ending at 0, a summary."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    description: str
    stochastic: bool = False


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(sample_euler, lambda steps: steps, "Euler on the probability-flow ODE (1st order)"),
    "heun": SamplerSpec(
        sample_heun,
        lambda steps: 2 * steps - 1,
        "Heun's 2nd-order method, EDM Alg. 2 (optional churn); last step to σ = 0 is Euler",
        stochastic=True,
    ),
    "ddim": SamplerSpec(sample_ddim, lambda steps: steps, "deterministic DDIM; identical to Euler in VE coordinates"),
    "consistency": SamplerSpec(
        sample_consistency,
        lambda steps: steps,
        "multistep consistency sampling, CM Alg. 1: f at each σ point, fresh noise in between",
        stochastic=True,
    ),
    "meanflow": SamplerSpec(
        sample_meanflow,
        lambda steps: steps,
        "MeanFlow jumps z_r = z_t − (t − r) u(z_t, r, t) on a flow-time grid from t = 1 (Geng et al. 2025, Alg. 2)",
    ),
}


def get_sampler(name: str) -> SamplerSpec:
    """The table row for ``name``, or a ``LitGenError`` naming the valid samplers."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise LitGenError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...] | torch.Size,
    *,
    steps: int = 18,
    sampler: str = "heun",
    sigmas: Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    label: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **sampler_kwargs: float,
) -> Tensor:
    """Draw samples: x = σ_0·N(0, I) with ``generator``, then run ``sampler`` over ``sigmas`` under no_grad.

    ``sigmas`` defaults to ``karras_sigmas(steps, sigma_min, sigma_max, rho)`` (so σ_0 = σ_max); a given grid is
    used as is (``steps`` and the σ range are then ignored). ``sampler_kwargs`` go to the sampler function
    (e.g. ``s_churn`` for Heun); a stochastic sampler also receives ``generator``.
    """
    spec = get_sampler(sampler)
    if sigmas is None:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device=device, dtype=dtype)
    else:
        sigmas = torch.as_tensor(sigmas).to(device=device, dtype=dtype)
    kwargs = dict(sampler_kwargs)
    if spec.stochastic:
        kwargs["generator"] = generator
    if label is not None:
        label = label.to(device)
    with torch.no_grad():
        x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype) * sigmas[0]
        return spec.fn(denoiser, x, sigmas, label, **kwargs)
