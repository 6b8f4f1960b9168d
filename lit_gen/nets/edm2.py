"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 2-3, Fig. 21 and App. B), with its uncertainty (log-variance) head, as one lit_gen network.

Written from the paper's equations and the facts of NVlabs/edm2 ``training/networks_edm2.py`` (read, not copied):

- ``normalize(x) = x / (ε + ‖x‖ / √(n))`` over all dims but the first (ε = 1e-4): unit magnitude per element.
- ``MPConv`` (eq. 47, 66): the weight is normalised to unit magnitude per output channel and scaled by gain / √fan_in
  at every call ("traditional" weight normalisation), and in training mode the stored weight is *overwritten* with
  its normalised value first ("forced" weight normalisation, so the optimiser's steps keep a fixed relative size).
  A kernel of ``[]`` is a fully-connected layer. No biases anywhere.
- ``mp_silu(x) = silu(x) / 0.596`` (eq. 81), ``mp_sum(a, b, t) = lerp(a, b, t) / √((1−t)² + t²)`` (eq. 88),
  ``mp_cat(a, b, t)`` (eq. 103): each keeps unit-magnitude inputs at unit magnitude.
- ``MPFourier`` (eq. 75): ``√2 cos(2π(f x + φ))`` with fixed f ~ N(0, 1), φ ~ U(0, 1) (stored premultiplied by 2π).
- ``Block`` (Fig. 21): encoder blocks resample, project (1×1 ``conv_skip``) when the width changes and pixel-normalise
  the main branch; the residual branch is conv3×3 → modulation by ``1 + emb_linear(emb, gain=emb_gain)`` → conv3×3;
  branches join by ``mp_sum(·, ·, res_balance=0.3)``; self-attention with pixel-normalised q/k/v (64 channels per
  head) joins by ``mp_sum(·, ·, attn_balance=0.3)``; activations are clipped to ±256.
- ``UNet``: the input gets a constant-one channel; the noise embedding is ``emb_noise(MPFourier(c_noise))``, mixed
  with the class embedding ``emb_label(onehot · √L)`` by ``mp_sum(·, ·, label_balance=0.5)``, then ``mp_silu``;
  decoder blocks take encoder skips through ``mp_cat(·, ·, concat_balance=0.5)``; the output is
  ``out_conv(x, gain=out_gain)`` with ``out_gain`` = 0 at initialisation, so a fresh network returns F = 0.
- ``Precond``: EDM's preconditioning with σ_data = 0.5 and c_noise = ln(σ)/4 (exactly ``diffusion.edm.EDM``), and
  the log-variance head ``u(σ) = logvar_linear(MPFourier(c_noise))`` (eq. 21) used by EDM2's loss; it is part of this
  network (``logvar(c_noise)``), so an imported teacher keeps every tensor of the source.

lit_gen's contract: ``net(x_in, c_noise, label) -> F``. Labels are class indices in [0, num_classes]; index
``num_classes`` (lit_gen's NULL row) and ``label=None`` are EDM2's own "no label" input, the zero class vector (its
``Precond`` feeds zeros when ``class_labels`` is None). EDM2 trains without label dropout, so that input is not a
trained unconditional model: EDM2 guides with a *separate* network (a small unconditional one for CFG, a smaller or
less-trained conditional one for autoguidance), which in lit_gen is a teacher exported with its guiding model.
Float class vectors [B, num_classes] (EDM2's own label format) are accepted as they are.

Differences from the source, on purpose: float64 inputs are normalised in float64 (EDM2 always takes norms in float32);
attention runs through ``F.scaled_dot_product_attention`` (the same softmax(qᵀk/√c) v); the optional ``aux_time`` /
``guidance_embed`` inputs of every lit_gen net are zero-initialised ordinary linear maps added to the noise embedding
(not magnitude-preserving, not force-normalised), so a teacher's weights start such a student unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.nets.denoiser import Denoiser, check_dropout, check_levels
from lit_gen.nets.embed import noise_vector
from lit_gen.spec import Configurable

NORM_EPS = 1e-4
SILU_MAGNITUDE = 0.596  # E[silu(x)²]^½ for x ~ N(0, 1) (EDM2 eq. 81)


def _norm_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: Tensor, dim: int | list[int] | None = None, eps: float = NORM_EPS) -> Tensor:
    """x / (ε + ‖x‖ √(|norm| / |x|)) over ``dim`` (default: all but the first): unit magnitude per element."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_norm_dtype(x))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU (EDM2 eq. 81)."""
    return F.silu(x) / SILU_MAGNITUDE


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving weighted sum (1 − t) a + t b, divided by √((1 − t)² + t²) (EDM2 eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation with balance ``t`` between a (0) and b (1) (EDM2 eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: Tensor, f: list[float], mode: str) -> Tensor:
    """EDM2's resampling: a separable FIR filter ``f`` (normalised to sum 1), 2× down by a strided depthwise
    convolution or 2× up by a transposed one (×4 gain); [1, 1] is 2×2 average pooling / nearest upsampling."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(f, dtype=torch.float64)
    pad = (len(f) - 1) // 2
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps)[None, None].to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    if mode == "down":
        return F.conv2d(x, kernel.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, (kernel * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)


class MPFourier(nn.Module):
    """√2 cos(x f + φ) with fixed f = 2π N(0, bandwidth²), φ = 2π U(0, 1) (EDM2 eq. 75). The buffers hold the float32
    bit patterns as int32 (as ``embed.FourierEmbedding``): casting the net to bf16 must not move the frequencies."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        freqs = 2 * math.pi * torch.randn(num_channels, dtype=torch.float32) * bandwidth
        phases = 2 * math.pi * torch.rand(num_channels, dtype=torch.float32)
        self.register_buffer("freqs_bits", freqs.view(torch.int32))
        self.register_buffer("phases_bits", phases.view(torch.int32))

    @property
    def freqs(self) -> Tensor:
        return self.freqs_bits.view(torch.float32)

    @property
    def phases(self) -> Tensor:
        return self.phases_bits.view(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _norm_dtype(x)
        y = x.to(dtype)[:, None] * self.freqs.to(dtype)[None, :] + self.phases.to(dtype)[None, :]
        return y.cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully-connected layer (kernel []) without bias
    (EDM2 eq. 47), with forced weight normalisation in training mode (eq. 66)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: float | Tensor = 1.0) -> Tensor:
        """normalize(w) · gain / √fan_in: every output channel has norm |gain| (the weight used at inference)."""
        w = self.weight.to(_norm_dtype(self.weight))
        return normalize(w) * (gain / math.sqrt(w[0].numel()))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        if self.training:
            with torch.no_grad():  # forced weight normalisation: the stored weight itself stays unit-magnitude
                self.weight.copy_(normalize(self.weight.to(_norm_dtype(self.weight))))
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2's U-Net block (Fig. 21), ``flavor`` "enc" or "dec", optional 2× resampling and self-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: tuple[float, ...] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        if attention and self.num_heads == 0:
            raise LitGenError(f"a {out_channels}-channel attention block needs channels_per_head <= {out_channels}")
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            n, _, height, width = x.shape
            y = self.attn_qkv(x).reshape(n, self.num_heads, -1, 3, height * width)
            q, k, v = normalize(y, dim=2).unbind(3)  # pixel norm per head; each [N, heads, c, HW]
            y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            y = self.attn_proj(y.transpose(-1, -2).reshape(x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(Denoiser, Configurable, nn.Module):
    """EDM2's U-Net and its log-variance head, F(x_in, c_noise, label) for ``diffusion.EDM(sigma_data=0.5)``.

    The names of the submodules are EDM2's (``enc["64x64_block0"].conv_res0`` ...; the head's ``logvar_fourier`` and
    ``logvar_linear`` from ``Precond``), so an imported ``Precond.unet`` maps one to one.

    Args:
        img_resolution: Height and width of the input (64 for EDM2's ImageNet-512 latents and ImageNet-64 pixels).
        in_channels: Channels of the input and the output (4 for SD-VAE latents, 3 for pixels).
        num_classes: Class-label dimensionality; 0 = unconditional.
        model_channels: Base width; level i has ``model_channels * channel_mult[i]`` channels (EDM2-S: 192).
        channel_mult: Width multiplier per resolution level.
        channel_mult_noise: Width of the Fourier features / model_channels (None: ``channel_mult[0]``).
        channel_mult_emb: Width of the embedding / model_channels (None: ``max(channel_mult)``).
        num_blocks: Blocks per level in the encoder (the decoder has one more per level).
        attn_resolutions: Resolutions whose blocks use self-attention (the first bottleneck block always does).
        label_balance: mp_sum balance between the noise (0) and the class embedding (1).
        concat_balance: mp_cat balance between the skip (0) and the main path (1).
        resample_filter: The FIR filter of the resampling blocks.
        channels_per_head: Channels per attention head.
        dropout: Dropout inside every block's residual branch (training only).
        res_balance: mp_sum balance between the main (0) and the residual branch (1).
        attn_balance: mp_sum balance between the main (0) and the attention branch (1).
        clip_act: Clip block outputs to ±clip_act (None: no clipping).
        logvar_channels: Fourier features of the log-variance head.
        aux_time: A second time input (MeanFlow's t − r) through a zero-initialised embedding.
        guidance_embed: The guidance weight as an input through a zero-initialised embedding (Meng et al. 2023).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        num_classes: int = 0,
        model_channels: int = 192,
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: tuple[float, ...] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        logvar_channels: int = 128,
        aux_time: bool = False,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        check_levels(img_resolution, channel_mult)
        check_dropout(dropout)
        levels = len(channel_mult)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.feature_dim = cblock[-1]
        block = dict(
            resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
        )  # fmt: skip
        attn_resolutions = tuple(attn_resolutions)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(num_classes, cemb, []) if num_classes else None

        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc", attention=attn, **block)

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec", attention=attn, **block)
        self.out_conv = MPConv(cout, in_channels, [3, 3])
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])
        self.build_optional_conditions(aux_time, guidance_embed, "positional", cnoise, cemb)

    def class_vector(self, label: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        """EDM2's class input: one-hot rows [B, L] for indices < L, zeros for the NULL index L and for None; a float
        [B, L] tensor is taken as it is."""
        if label is None:
            return torch.zeros(batch_size, self.num_classes, device=device)
        if label.is_floating_point() and label.ndim == 2:
            if label.shape[1] != self.num_classes:
                raise LitGenError(f"class vectors have {label.shape[1]} entries, the network {self.num_classes}")
            return label.to(torch.float32)
        index = label.reshape(-1).to(torch.long)
        return F.one_hot(index, self.num_classes + 1)[:, : self.num_classes].to(torch.float32)

    def embed(
        self,
        c_noise: Tensor,
        batch_size: int,
        device: torch.device,
        label: Tensor | None = None,
        c_aux: Tensor | None = None,
        c_guide: Tensor | None = None,
    ) -> Tensor:
        """The conditioning vector: mp_silu(mp_sum(emb_noise(MPFourier(c_noise)), emb_label(onehot · √L)))."""
        emb = self.emb_noise(self.emb_fourier(noise_vector(c_noise, batch_size, device)))
        emb = self.add_optional_conditions(emb, c_aux, c_guide, batch_size, device)
        if self.emb_label is not None:
            vector = self.class_vector(label, batch_size, device).to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(vector * math.sqrt(self.num_classes)), t=self.label_balance)
        return mp_silu(emb)

    def condition(
        self, x: Tensor, c_noise: Tensor, label: Tensor | None, c_aux: Tensor | None, c_guide: Tensor | None
    ) -> Tensor:
        """``embed`` for the batch of ``x``."""
        return self.embed(c_noise, x.shape[0], x.device, label, c_aux, c_guide)

    def _encode(self, x: Tensor, emb: Tensor, levels: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            if levels is not None and name.endswith("_down"):
                levels.append(x)
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        return x, skips

    def _bottleneck(self, x: Tensor, emb: Tensor) -> Tensor:
        for name, block in self.dec.items():
            if "_in" not in name:
                break
            x = block(x, emb)
        return x

    def features_at(self, x: Tensor, emb: Tensor) -> Tensor:
        """Bottleneck activations [B, feature_dim, R, R] (after the decoder's two ``in`` blocks)."""
        return self._bottleneck(self._encode(x, emb)[0], emb)

    def feature_levels_at(self, x: Tensor, emb: Tensor) -> list[Tensor]:
        """Encoder activations at every resolution, finest first (the input of each downsampling block), then the
        bottleneck (as ``UNet.feature_levels``)."""
        levels: list[Tensor] = []
        h, _ = self._encode(x, emb, levels)
        return [*levels, self._bottleneck(h, emb)]

    def output(self, x: Tensor, emb: Tensor) -> Tensor:
        """F(x_in, c_noise, label) with the shape of ``x`` (EDM2's ``UNet.forward``)."""
        h, skips = self._encode(x, emb)
        for name, block in self.dec.items():
            if "block" in name:
                h = mp_cat(h, skips.pop(), t=self.concat_balance)
            h = block(h, emb)
        return self.out_conv(h, gain=self.out_gain)

    def logvar(self, c_noise: Tensor) -> Tensor:
        """EDM2's uncertainty u(σ) (eq. 21, ``Precond(return_logvar=True)``) at c_noise = ln(σ)/4, shape [B]."""
        c = noise_vector(c_noise, c_noise.numel() if c_noise.ndim else 1, self.out_gain.device)
        return self.logvar_linear(self.logvar_fourier(c)).reshape(-1)
