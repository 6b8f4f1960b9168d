"""DDPM++ U-Net (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), as configured by EDM.

Follows the layout of EDM's ``SongUNet`` in its DDPM++ setting (Karras et al. 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models", config F, DDPM++ on CIFAR-10): standard encoder and decoder, residual blocks
scaled by 1/sqrt(2), a [1, 1] resampling filter, a 1x1-projected skip on resampling blocks, single-head
self-attention at the listed resolutions and always in the first bottleneck block, GroupNorm(eps=1e-6), SiLU,
Xavier-uniform initialisation with near-zero residual outputs. A [1, 1] filter *is* 2x2 average pooling down and
nearest-neighbour up, which is what this module uses (there is no ``resample_filter`` option: NCSN++'s
[1, 3, 3, 1] is not offered).

Differences from EDM's DDPM++, on purpose:
- ``adaptive_scale=True`` (default): each block's embedding gives a per-channel scale *and* shift,
  ``silu(norm(h) * (1 + scale) + shift)`` as in ADM (Dhariwal & Nichol 2021); EDM's DDPM++ adds a shift only
  (``adaptive_scale=False`` here reproduces it and its parameter count).
- Class labels use a learned table with a NULL row (``embed.LabelEmbedding``) instead of a linear map of one-hots.
- The final convolution is exactly zero at initialisation, so a fresh network returns F = 0.

Width on a CIFAR-10 config (32x32x3, 128 channels, mult (2, 2, 2), 4 blocks, attention at 16): about 60.1M
parameters with ``adaptive_scale=True``, 55.7M (EDM's count) with ``adaptive_scale=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_gen.nets.denoiser import Denoiser, check_dropout, check_levels
from lit_gen.nets.embed import LabelEmbedding, noise_embedding, noise_vector
from lit_gen.spec import Configurable

SKIP_SCALE = math.sqrt(0.5)  # residual sums are scaled by 1/sqrt(2) to keep unit variance (DDPM++).
GROUPNORM_EPS = 1e-6


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input's dtype (the same parameters and state-dict keys).

    Under autocast the result stays float32, as CUDA's autocast policy already runs ``group_norm``; outside it,
    the result goes back to the input's dtype (a frozen teacher kept in bf16). Why not plain ``nn.GroupNorm``: CPU
    autocast runs it in bf16, and there forward-mode AD (sCM's and MeanFlow's ``torch.func.jvp``) returns a float32
    tangent for the bf16 output, so the next convolution fails on mixed dtypes (torch 2.14, seen in
    benchmarks/gpu.py --tiny). For float32 and float64 inputs this is exactly ``nn.GroupNorm``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (EDM's rule), so tiny widths work too."""
    groups = max(1, min(32, num_channels // 4))
    while num_channels % groups:
        groups -= 1
    return Float32GroupNorm(groups, num_channels, eps=GROUPNORM_EPS)


def _xavier(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Conv2d | nn.Linear:
    """EDM's initialisation: Xavier-uniform weights times ``gain``, zero bias."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return _xavier(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), gain)


class UNetBlock(nn.Module):
    """Residual block with optional 2x resampling and self-attention (EDM's ``UNetBlock`` in its DDPM++ setting).

    ``h = conv1(dropout(silu(modulate(norm1(conv0(resample(silu(norm0(x))))), emb))))``,
    ``x = (h + skip(resample(x))) / sqrt(2)``, then optionally ``x = (x + attn(norm2(x))) / sqrt(2)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample: str | None = None,
        attention: bool = False,
        dropout: float = 0.0,
        adaptive_scale: bool = True,
    ) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.dropout = dropout
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3)
        self.affine = _xavier(nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1)))
        self.norm1 = group_norm(out_channels)
        self.conv1 = _conv(out_channels, out_channels, 3, gain=1e-5)
        needs_skip = in_channels != out_channels or resample is not None
        self.skip = _conv(in_channels, out_channels, 1) if needs_skip else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = _conv(out_channels, out_channels * 3, 1, gain=math.sqrt(0.2))
            self.proj = _conv(out_channels, out_channels, 1, gain=1e-5)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * SKIP_SCALE
        if self.attention:
            x = (x + self._attend(self.norm2(x))) * SKIP_SCALE
        return x

    def _attend(self, x: Tensor) -> Tensor:
        """Single-head self-attention over the H*W positions (DDPM++), via ``F.scaled_dot_product_attention``."""
        b, c, height, width = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, 1, c, height * width).transpose(-1, -2).unbind(1)  # each [B, 1, HW, C]
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(-1, -2).reshape(b, c, height, width))


class UNet(Denoiser, Configurable, nn.Module):
    """DDPM++ U-Net denoiser F(x, c_noise, label) (Song et al. 2021; EDM's SongUNet config, Karras et al. 2022).

    Input and output are [B, C, H, W] with H = W = ``img_resolution``. The noise level ``c_noise`` ([B], O(1),
    e.g. ln(sigma)/4) goes through a sinusoidal or Fourier embedding and a 2-layer SiLU MLP; the class label
    embedding is added before that MLP. Every residual block receives the result and turns it into a per-channel
    scale and shift. A fresh network returns exactly zero (the output convolution is zero-initialised).

    Args:
        img_resolution: Height and width of the images; must be divisible by 2^(len(channel_mult) - 1).
        in_channels: Image channels at the input.
        out_channels: Channels of the output; None means ``in_channels``.
        model_channels: Base width; level i has ``model_channels * channel_mult[i]`` channels.
        channel_mult: Width multiplier per resolution level (one level per entry, halving the resolution).
        num_blocks: Residual blocks per level in the encoder (the decoder has one more per level).
        attn_resolutions: Resolutions whose blocks use self-attention (the bottleneck always has one).
        dropout: Dropout probability inside each residual block (EDM uses 0.13 on CIFAR-10).
        num_classes: Number of classes for class conditioning; 0 = unconditional (labels are ignored).
        embedding_type: Noise-level embedding, "positional" (DDPM++) or "fourier" (NCSN++).
        channel_mult_emb: Width of the conditioning vector as a multiple of ``model_channels``.
        adaptive_scale: Let the conditioning give each block a scale and a shift (True) or a shift only (False,
            exactly EDM's DDPM++).
        aux_time: Take a second time input ``c_aux`` (MeanFlow's t − r) through a zero-initialised embedding
            (``embed.AuxTimeEmbedding``) added to the noise embedding; off by default.
        guidance_embed: Take the guidance weight ``c_guide`` (a w-conditioned distilled student, Meng et al. 2023)
            through a zero-initialised embedding (``embed.GuidanceEmbedding``); off by default.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.10,
        num_classes: int = 0,
        embedding_type: str = "positional",
        channel_mult_emb: int = 4,
        adaptive_scale: bool = True,
        aux_time: bool = False,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        check_levels(img_resolution, channel_mult)
        check_dropout(dropout)
        levels = len(channel_mult)
        out_channels = in_channels if out_channels is None else out_channels
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.feature_dim = model_channels * channel_mult[-1]

        # Mapping network: noise (+ label) embedding -> conditioning vector.
        emb_channels = model_channels * channel_mult_emb
        self.map_noise = noise_embedding(embedding_type, model_channels)
        self.map_label = LabelEmbedding(num_classes, model_channels) if num_classes > 0 else None
        self.map_layer0 = _xavier(nn.Linear(model_channels, emb_channels))
        self.map_layer1 = _xavier(nn.Linear(emb_channels, emb_channels))

        block = dict(emb_channels=emb_channels, dropout=dropout, adaptive_scale=adaptive_scale)
        attn_resolutions = tuple(attn_resolutions)

        # Encoder: a 3x3 input conv, then per level an optional downsampling block and num_blocks blocks.
        self.conv_in = _conv(in_channels, model_channels, 3)
        self.enc = nn.ModuleList()
        skips = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, resample="down", **block))
                skips.append(cout)
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
                skips.append(cout)

        # Bottleneck at the lowest resolution: one block with attention, one without.
        self.mid = nn.ModuleList([UNetBlock(cout, cout, attention=True, **block), UNetBlock(cout, cout, **block)])

        # Decoder: per level an optional upsampling block, then num_blocks + 1 blocks fed with encoder skips.
        self.dec = nn.ModuleList()
        self._dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level < levels - 1:
                self.dec.append(UNetBlock(cout, cout, resample="up", **block))
                self._dec_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(UNetBlock(cin, cout, attention=attn, **block))
                self._dec_takes_skip.append(True)
        self.out_norm = group_norm(cout)
        self.out_conv = nn.Conv2d(cout, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.build_optional_conditions(aux_time, guidance_embed, embedding_type, model_channels, model_channels)

    def condition(
        self, x: Tensor, c_noise: Tensor, label: Tensor | None, c_aux: Tensor | None, c_guide: Tensor | None
    ) -> Tensor:
        """The conditioning vector [B, emb_channels]: the mapping network of noise (+ aux, guide, label)."""
        emb = self.map_noise(noise_vector(c_noise, x.shape[0], x.device)).to(self.map_layer0.weight.dtype)
        emb = self.add_optional_conditions(emb, c_aux, c_guide, x.shape[0], x.device)
        if self.map_label is not None:
            emb = emb + self.map_label(label, x.shape[0])
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def _encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        return h, skips

    def features_at(self, x: Tensor, emb: Tensor) -> Tensor:
        """Bottleneck activations [B, feature_dim, R, R], R = img_resolution / 2^(len(channel_mult) - 1)."""
        return self._encode(x, emb)[0]

    def feature_levels_at(self, x: Tensor, emb: Tensor) -> list[Tensor]:
        """Encoder activations at every resolution, finest first: the last block of each level [B, C_l, R_l, R_l]
        and, for the lowest level, the bottleneck output. FastGen's EDM discriminator reads these levels
        (32/16/8 for CIFAR-10) instead of the bottleneck alone; so do lit_gen's multi-level heads."""
        h = self.conv_in(x)
        levels: list[Tensor] = []
        for block in self.enc:
            if block.resample == "down":
                levels.append(h)
            h = block(h, emb)
        for block in self.mid:
            h = block(h, emb)
        return [*levels, h]

    def output(self, x: Tensor, emb: Tensor) -> Tensor:
        """F with the shape of ``x``: encoder, bottleneck, decoder with skips."""
        h, skips = self._encode(x, emb)
        for block, takes_skip in zip(self.dec, self._dec_takes_skip, strict=True):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
