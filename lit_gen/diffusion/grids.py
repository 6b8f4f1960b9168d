"""Noise-level grids (time discretisations) for the samplers."""

from __future__ import annotations

import torch
from torch import Tensor

from lit_gen.errors import LitGenError


def karras_sigmas(
    n: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """EDM grid σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < n, σ_n = 0 (Karras et al. 2022,
    eq. 5). Shape [n + 1]; σ_0 = σ_max, σ_{n−1} = σ_min and σ_n = 0 exactly (in ``dtype``).

    ``n`` is the number of steps. For n = 1 the grid is [σ_max, 0] (one jump from pure noise to the data).
    """
    if n < 1:
        raise LitGenError(f"the number of sampling steps must be at least 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise LitGenError(f"the sigma grid needs 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], device=device, dtype=dtype)
    i = torch.arange(n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (n - 1) * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)
