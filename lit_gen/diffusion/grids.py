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


def schedule_from_grid(grid: list[float] | Tensor, steps: int, exact: bool = True) -> Tensor:
    """A ``steps``-step σ schedule taken from a student's trained ``grid`` (descending, ending at 0, M + 1 points).

    Students trained to jump between fixed σ points (TRACT/BTD segment boundaries, consistency σ points, a one-step
    generator's [σ_max, 0]) record that grid in their checkpoint. K steps take every (M/K)-th point; with
    ``exact=True`` K must divide M (a jump the student never learned is refused), otherwise the nearest points of an
    even spacing are used.
    """
    values = torch.as_tensor(grid, dtype=torch.float64)
    m = values.numel() - 1
    if m < 1 or steps < 1 or steps > m or (exact and m % steps):
        valid = [k for k in range(1, m + 1) if m % k == 0] if exact else list(range(1, m + 1))
        raise LitGenError(
            f"this student was trained on a {m}-step grid; --steps must be one of {', '.join(map(str, valid))}"
        )
    index = torch.linspace(0, m, steps + 1, dtype=torch.float64).round().long()
    return values[index].float()
