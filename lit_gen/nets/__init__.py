"""Architectures only: every network maps (x, c_noise [B], label [B] | None) to F with the shape of x.

``UNet`` (DDPM++), ``DiT`` (adaLN-Zero transformer from timm blocks) and ``MLPDenoiser`` (points) share one
contract: ``c_noise`` is O(1) (the caller's ln(sigma)/4), ``num_classes`` rows plus a NULL row embed labels
(``label=None`` = NULL), the output layer is zero-initialised (a fresh net returns 0), and ``features(...)``
with ``feature_dim`` expose an intermediate representation for discriminator heads.
"""

from lit_gen.nets.dit import DiT
from lit_gen.nets.mlp import MLPDenoiser
from lit_gen.nets.unet import UNet

__all__ = ["DiT", "MLPDenoiser", "UNet"]
