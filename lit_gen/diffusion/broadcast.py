"""Shape helpers shared by the parameterisations and samplers: per-sample coefficients against batched tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to ``t`` until it has ``ndim`` dims (a [B] coefficient against [B, C, H, W])."""
    missing = ndim - t.ndim
    if missing < 0:
        raise ValueError(f"tensor has {t.ndim} dims, more than the target {ndim}")
    return t.reshape(*t.shape, *([1] * missing))


def coef_like(c: Tensor | float, x: Tensor) -> Tensor | float:
    """A scalar or per-sample coefficient made broadcastable against ``x`` (leading dims aligned, not trailing).

    Python numbers and 0-d tensors pass through; a tensor of shape [B] (or [B, ...] with fewer dims than ``x``)
    gets trailing singleton dims. A tensor that already has ``x.ndim`` dims is returned unchanged.
    """
    if isinstance(c, Tensor) and 0 < c.ndim < x.ndim:
        return append_dims(c, x.ndim)
    return c


def compute_dtype(x: Tensor) -> torch.dtype:
    """Preconditioning and loss weights are computed in float32 at least, whatever the training precision."""
    return torch.promote_types(x.dtype, torch.float32)


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise level(s) as a tensor of shape [B] on ``x``'s device, in ``compute_dtype(x)``.

    Accepts a Python number, a 0-d tensor, or any tensor with exactly B elements ([B], [B, 1, 1, 1], ...).
    """
    batch = x.shape[0]
    s = torch.as_tensor(sigma, device=x.device, dtype=compute_dtype(x))
    if s.ndim == 0:
        return s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma has shape {tuple(s.shape)}; expected a scalar or {batch} per-sample values")
    return s.reshape(batch)
