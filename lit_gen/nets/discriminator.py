"""Discriminator heads on diffusion features (DMD2, Yin et al. 2024, §4.2; f-distill, Xu et al. 2025, §4.2).

A head reads intermediate features of a diffusion network at a noisy input — the frozen teacher's, or (DMD2's
choice) the trainable fake score's — ``net.feature_levels(...)`` of the nets in this package, and returns one logit
ℓ per sample. Trained with the logistic loss on noisy real vs noisy generated samples, the optimal logit is
ln(p_σ/q_σ), the log density ratio f-distill weights its gradient with.

:class:`MultiLevelDiscriminator` puts one :class:`DiscriminatorHead` on every feature level and sums their logits
(so the sum, not each level, is trained towards ln r). FastGen's EDM discriminator reads the 32/16/8 levels of the
CIFAR-10 UNet and reduces each with strided convolutions, without a mean-pool: a head that averages the bottleneck
over positions cannot see *where* a stroke is, which on digits left it at chance (held-out accuracy ≈ 0.51).

Per level, by layout:
- vectors [B, C] (``MLPDenoiser``'s residual stream): LayerNorm → Linear → SiLU → Linear → 1;
- maps [B, C, R, R] (``UNet`` levels): 4×4 stride-2 convs with GroupNorm + SiLU down to 4×4 or less, then (position-
  aware) a linear layer over the flattened map — ``pool=True`` averages over positions instead (DMD2's
  ``cls_pred_branch`` shape);
- tokens [B, T, C] (``DiT`` blocks): LayerNorm → Linear(C → 16) → SiLU per token, flattened over tokens (position-
  aware) → Linear → 1; ``pool=True`` averages over tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

TOKEN_WIDTH = 16  # per-token width before the tokens are flattened (position-aware token head)


def _groups(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most 32 (GroupNorm groups)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class DiscriminatorHead(Configurable, nn.Module):
    """Logit head ℓ(features) for one feature layout.

    Args:
        feature_shape: shape of one sample's features without the batch dim: [C], [C, R, R] or [T, C].
        hidden: width of the hidden layer (vectors/tokens) or of the conv stack (maps); 0 = the feature width C.
        pool: average maps over positions / tokens over the sequence before the last layer (position-blind);
            False = flatten them (position-aware).
    """

    def __init__(self, feature_shape: list[int], hidden: int = 0, pool: bool = False) -> None:
        super().__init__()
        shape = [int(s) for s in feature_shape]
        if len(shape) not in (1, 2, 3) or min(shape) < 1:
            raise LitGenError(f"discriminator features must be [C], [T, C] or [C, R, R]; got {shape}")
        self.feature_shape = shape
        self.pool = bool(pool)
        if len(shape) == 1:
            width = hidden or shape[0]
            self.body = nn.Sequential(nn.LayerNorm(shape[0]), nn.Linear(shape[0], width), nn.SiLU())
            flat = width
        elif len(shape) == 2:
            width = hidden or shape[1]
            if not self.pool:
                width = min(width, TOKEN_WIDTH)
            self.body = nn.Sequential(nn.LayerNorm(shape[1]), nn.Linear(shape[1], width), nn.SiLU())
            flat = width if self.pool else width * shape[0]
        else:
            channels, res = shape[0], shape[1]
            width = hidden or channels
            layers: list[nn.Module] = []
            cin = channels
            while res > 4:
                layers += [
                    nn.Conv2d(cin, width, kernel_size=4, stride=2, padding=1),
                    nn.GroupNorm(_groups(width), width),
                    nn.SiLU(),
                ]
                cin, res = width, res // 2
            layers += [nn.Conv2d(cin, width, kernel_size=3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
            self.body = nn.Sequential(*layers)
            flat = width if self.pool else width * res * res
        self.out = nn.Linear(flat, 1)
        # Start at logit 0 (r = 1, every divergence's weights equal) with a small random read-out.
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(flat) * 0.1)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor) -> Tensor:
        """Logits [B] for features [B, *feature_shape]."""
        if list(features.shape[1:]) != self.feature_shape:
            raise LitGenError(f"discriminator expects features {self.feature_shape}, got {list(features.shape[1:])}")
        h = self.body(features.to(self.out.weight.dtype))
        if self.pool and h.ndim == 4:
            h = h.mean(dim=(2, 3))
        elif self.pool and h.ndim == 3:
            h = h.mean(dim=1)
        return self.out(h.flatten(1)).squeeze(1)


class MultiLevelDiscriminator(Configurable, nn.Module):
    """One :class:`DiscriminatorHead` per feature level; the logit is their sum (trained as one logit).

    Args:
        level_shapes: the shape of each level's features for one sample (``[[C, R, R], ...]`` etc.).
        hidden: width of every head (0 = each level's feature width).
        pool: position-blind heads (see :class:`DiscriminatorHead`).
    """

    def __init__(self, level_shapes: list[list[int]], hidden: int = 0, pool: bool = False) -> None:
        super().__init__()
        if not level_shapes:
            raise LitGenError("the discriminator needs at least one feature level")
        self.heads = nn.ModuleList([DiscriminatorHead(shape, hidden=hidden, pool=pool) for shape in level_shapes])

    def forward(self, levels: list[Tensor]) -> Tensor:
        """Logits [B]: Σ_l head_l(levels[l])."""
        if len(levels) != len(self.heads):
            raise LitGenError(f"discriminator expects {len(self.heads)} feature levels, got {len(levels)}")
        return torch.stack([head(f) for head, f in zip(self.heads, levels, strict=True)]).sum(0)
