"""Discriminator head on frozen diffusion features (DMD2, Yin et al. 2024, §4.2; f-distill, Xu et al. 2025, §4.2).

The head reads the intermediate features of the (frozen) teacher at a noisy input, ``net.features(...)`` of the
nets in this package, and returns one logit ℓ per sample. Trained with the logistic loss on noisy real vs noisy
generated samples, the optimal logit is ln(p_σ/q_σ), the log density ratio f-distill weights its gradient with.

The feature layout decides the head:
- vectors [B, C] (``MLPDenoiser``'s last hidden layer): LayerNorm → Linear → SiLU → Linear → 1;
- maps [B, C, R, R] (``UNet`` bottleneck): 4×4 stride-2 convs with GroupNorm + SiLU down to 4×4 or less, then a
  mean over positions and a linear layer, the shape of DMD2's ``cls_pred_branch`` for any R;
- tokens [B, T, C] (``DiT`` blocks' output): LayerNorm → Linear → SiLU per token, mean over tokens → Linear → 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable


def _groups(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most 32 (GroupNorm groups)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class DiscriminatorHead(Configurable, nn.Module):
    """Logit head ℓ(features) for one feature layout.

    Args:
        feature_shape: shape of one sample's features without the batch dim: [C], [C, R, R] or [T, C].
        hidden: width of the hidden layer (vectors/tokens) or of the conv stack (maps); 0 = the feature width C.
    """

    def __init__(self, feature_shape: list[int], hidden: int = 0) -> None:
        super().__init__()
        shape = [int(s) for s in feature_shape]
        if len(shape) not in (1, 2, 3) or min(shape) < 1:
            raise LitGenError(f"discriminator features must be [C], [T, C] or [C, R, R]; got {shape}")
        self.feature_shape = shape
        if len(shape) == 1:
            width = hidden or shape[0]
            self.body = nn.Sequential(nn.LayerNorm(shape[0]), nn.Linear(shape[0], width), nn.SiLU())
        elif len(shape) == 2:
            width = hidden or shape[1]
            self.body = nn.Sequential(nn.LayerNorm(shape[1]), nn.Linear(shape[1], width), nn.SiLU())
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
        self.out = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        """Logits [B] for features [B, *feature_shape]."""
        if list(features.shape[1:]) != self.feature_shape:
            raise LitGenError(f"discriminator expects features {self.feature_shape}, got {list(features.shape[1:])}")
        h = self.body(features.to(self.out.weight.dtype))
        if h.ndim == 4:
            h = h.mean(dim=(2, 3))
        elif h.ndim == 3:
            h = h.mean(dim=1)
        return self.out(h).squeeze(1)
