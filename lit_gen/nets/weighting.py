"""The learned loss weighting of sCM (Lu & Song 2024, Sec. 4.2; EDM2, Karras et al. 2024, Sec. 3 "uncertainty"):
a scalar w_φ(t) per sample from a small MLP on the time, trained jointly with the network through the loss
e^{−w}·L + w (whose minimiser is w = ln E[L | t]: every t ends up with unit weighted loss)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lit_gen.nets.embed import noise_embedding, noise_vector
from lit_gen.spec import Configurable


class AdaptiveWeight(Configurable, nn.Module):
    """w_φ(c) for a time/noise input c of shape [B]: features → Linear → SiLU → Linear → [B] (float32).

    The output layer is zero-initialised, so training starts from unit weights (w = 0, e^0 = 1). The features are
    EDM2's choice for its log-variance head (Fourier features of c_noise) by default.

    Args:
        channels: width of the time features and of the hidden layer.
        embedding_type: "fourier" (random Fourier features) or "positional" (sinusoidal).
        fourier_scale: standard deviation of the Fourier frequencies (c is O(1)).
    """

    def __init__(self, channels: int = 128, embedding_type: str = "fourier", fourier_scale: float = 1.0) -> None:
        super().__init__()
        self.features = noise_embedding(embedding_type, channels, fourier_scale=fourier_scale)
        self.hidden = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, c: Tensor) -> Tensor:
        c = noise_vector(c, c.reshape(-1).shape[0], c.device)
        h = F.silu(self.hidden(self.features(c).to(self.hidden.weight.dtype)))
        return self.out(h).reshape(-1).float()
