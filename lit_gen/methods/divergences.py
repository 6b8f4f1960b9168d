"""The f-divergence table of f-distill (Xu, Nie & Vahdat 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching", Table 1) and the density-ratio weights it turns into.

With r = p/q (teacher density over student density, both at noise level σ) an f-divergence is
D_f(p ‖ q) = E_q[f(r)] with f convex, f(1) = 0. Its gradient with respect to the generator is the reverse-KL
(VSD/DMD) score difference weighted per sample by h(r) = f''(r)·r² (f-distill Thm. 1 / eq. 8):

    ∇_θ D_f = E[ w_σ · h(r(x_σ)) · (∇log q_σ(x_σ) − ∇log p_σ(x_σ))ᵀ ∂x_σ/∂θ ].

Every entry below carries ``f`` and ``h`` so that ``h(r) = f''(r)·r²`` can be checked by automatic differentiation
(tests/test_divergences.py). Constant factors of h do not matter: the weights are divided by their batch mean
(``normalized_weights``). Numerics (DESIGN style 7): ratios and weights are computed in float32 or wider whatever the
training precision; the batch mean is global when a ``reduce_sum`` that all-reduces across ranks is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_gen.errors import LitGenError

Fn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Divergence:
    """One row of the table: the generator ``f`` (D_f = E_q[f(p/q)]) and its weight ``h(r) = f''(r)·r²``.

    Args:
        name: the ``--model.divergence`` value.
        f: the convex generator f(r), f(1) = 0.
        h: the weight function h(r) = f''(r)·r² (closed form).
        title: human-readable name.
    """

    name: str
    f: Fn
    h: Fn
    title: str

    @property
    def needs_ratio(self) -> bool:
        """False only for reverse-KL, whose weight is constant (DMD/VSD needs no discriminator for it)."""
        return self.name != "rkl"


def _xlogx(r: Tensor) -> Tensor:
    return r * torch.log(r)


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        # KL(q ‖ p) = E_q[−ln r]: f'' = 1/r², h ≡ 1. This is VSD (Wang et al. 2023) / DMD (Yin et al. 2024).
        Divergence("rkl", lambda r: -torch.log(r), lambda r: torch.ones_like(r), "reverse KL"),
        # f(r) = (r+1) ln((r+1)/(2r)): f'' = 1/(r²(1+r)), h = 1/(1+r) (f-distill Table 1, softened RKL).
        Divergence(
            "softened_rkl", lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda r: 1 / (1 + r), "softened RKL"
        ),
        # Jensen-Shannon, f(r) = r ln r − (1+r) ln((1+r)/2): f'' = 1/(r(1+r)), h = r/(1+r).
        Divergence(
            "js", lambda r: _xlogx(r) - (1 + r) * torch.log((1 + r) / 2), lambda r: r / (1 + r), "Jensen-Shannon"
        ),
        # Squared Hellinger H² = ½ E_q[(√r − 1)²]: f'' = ¼ r^(−3/2), h = ¼ √r (the reference code uses √r: the
        # same after normalisation, ALGORITHMS.md §6).
        Divergence(
            "hellinger", lambda r: 0.5 * (torch.sqrt(r) - 1) ** 2, lambda r: 0.25 * torch.sqrt(r), "squared Hellinger"
        ),
        # KL(p ‖ q) = E_q[r ln r]: f'' = 1/r, h = r.
        Divergence("fkl", _xlogx, lambda r: r, "forward KL"),
        # Jeffreys = KL(p‖q) + KL(q‖p), f(r) = (r − 1) ln r: f'' = 1/r + 1/r², h = r + 1.
        Divergence("jeffreys", lambda r: (r - 1) * torch.log(r), lambda r: r + 1, "Jeffreys"),
    )
}


def alpha_divergence(alpha: float) -> Divergence:
    """Amari's α-divergence, f(r) = (r^α − α r − (1 − α)) / (α(α − 1)), so f'' = r^(α−2) and h = r^α.

    α → 0 is reverse KL (h ≡ 1), α → 1 forward KL (h = r), α = ½ squared Hellinger up to a constant. (f-distill
    lists the family; h = r^α follows from f'' and is checked by autograd, ALGORITHMS.md §5 marks it unverified.)
    """
    if alpha in (0.0, 1.0):
        raise LitGenError(f"alpha must not be 0 or 1 (use divergence rkl or fkl), got {alpha}")
    a = float(alpha)
    return Divergence(
        f"alpha{a:g}",
        lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)),
        lambda r: r**a,
        f"alpha-divergence (alpha={a:g})",
    )


def get_divergence(name: str, alpha: float = 0.5) -> Divergence:
    """The table entry ``name`` (``alpha`` selects the member of the ``alpha`` family)."""
    if name == "alpha":
        return alpha_divergence(alpha)
    if name not in DIVERGENCES:
        choices = ", ".join([*DIVERGENCES, "alpha"])
        raise LitGenError(f"unknown divergence {name!r}; choose one of {choices}")
    return DIVERGENCES[name]


def density_ratio(logit: Tensor, logit_clip: float = 10.0, ratio_min: float = 0.1, ratio_max: float = 20.0) -> Tensor:
    """r = exp(ℓ) from the discriminator logit ℓ ≈ ln(p/q), clamped (f-distill §4.2 / reference code: logit to
    ±``logit_clip``, then r to [``ratio_min``, ``ratio_max``]). Float32 or wider, no gradient."""
    dtype = torch.promote_types(logit.dtype, torch.float32)
    ell = logit.detach().to(dtype).clamp(-logit_clip, logit_clip)
    return torch.exp(ell).clamp(ratio_min, ratio_max)


def normalized_weights(h: Tensor, reduce_sum: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-6) -> Tensor:
    """h / mean(h), the mean over the global batch (f-distill §4.2: "normalise h by its batch mean").

    ``reduce_sum`` sums a tensor over all ranks (an all-reduce); None = this process's batch only. The count is
    reduced the same way, so ranks with different batch sizes still get the global mean.
    """
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    stats = torch.stack([h.sum(), torch.tensor(float(h.numel()), dtype=h.dtype, device=h.device)])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    return h / (stats[0] / stats[1] + eps)


def ratio_bin_means(
    ratio: Tensor,
    position: Tensor,
    bins: int,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-bin (sum of r, count) of the batch, bins = equal intervals of ``position`` ∈ [0, 1] (the noise level's
    place on the sampling ramp), all-reduced by ``reduce_sum``. Shapes [bins], float32 or wider.

    f-distill's reference code divides r by its running mean over noise-level bins, so that E_q[r] = 1 (the exact
    density ratio has mean 1 under q) holds at every noise level; this computes the batch statistics for it.
    """
    dtype = torch.promote_types(ratio.dtype, torch.float32)
    idx = (position.detach().to(torch.float64) * bins).floor().long().clamp(0, bins - 1)
    sums = torch.zeros(bins, dtype=dtype, device=ratio.device).index_add_(0, idx, ratio.to(dtype))
    counts = torch.zeros(bins, dtype=dtype, device=ratio.device).index_add_(0, idx, torch.ones_like(ratio, dtype=dtype))
    stats = torch.stack([sums, counts])
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    return stats[0], stats[1]
