"""Conditioning embeddings shared by every network: noise level, class label and an optional second time.

Networks know nothing about noise schedules: they receive ``c_noise`` of shape [B], O(1) in range (EDM passes
ln(sigma)/4, Karras et al. 2022, Table 1), and embed it with one of the two maps of Song et al. 2021
("Score-Based Generative Modeling through SDEs"): sinusoidal positions (DDPM++, from the Transformer) or random
Fourier features (NCSN++, Tancik et al. 2020). Class labels share one convention, ``LabelEmbedding``: row
``num_classes`` is the learned NULL class used by classifier-free guidance, and ``label=None`` means all-null.

A second time input ``c_aux`` (MeanFlow's t − r, Geng et al. 2025) enters through ``AuxTimeEmbedding`` when a net is
built with ``aux_time=True``: its own features, then a zero-initialised linear map added to the noise embedding, so
at initialisation the net computes exactly what it computes without it (a teacher's weights start it unchanged).
``aux_time=False`` (the default) builds nothing and leaves the net's spec as it was.

A guidance weight ``c_guide`` (Meng et al. 2023, "On Distillation of Guided Diffusion Models": a student conditioned
on the classifier-free guidance weight w; LCM, Luo et al. 2023, the same with a w-embedding MLP) enters the same way
through ``GuidanceEmbedding`` when a net is built with ``guidance_embed=True``: sinusoidal features of w, then a
zero-initialised linear map added to the noise embedding, so a teacher's weights start the student unchanged at
every w. ``c_guide=None`` adds nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_gen.errors import LitGenError

EMBEDDING_TYPES = ("positional", "fourier")


def noise_vector(c_noise: Tensor | float, batch_size: int, device: torch.device | None = None) -> Tensor:
    """``c_noise`` as a float32 vector of length ``batch_size`` (a scalar or a one-element tensor is broadcast)."""
    c_noise = torch.as_tensor(c_noise, device=device).to(torch.float32).reshape(-1)
    if c_noise.shape[0] != batch_size:
        if c_noise.shape[0] != 1:
            raise ValueError(f"c_noise has {c_noise.shape[0]} entries for a batch of {batch_size}; pass shape [B]")
        c_noise = c_noise.expand(batch_size)
    return c_noise


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (Vaswani et al. 2017; DDPM, Ho et al. 2020; DDPM++).

    Maps [B] to [B, num_channels] as ``[cos(x * f_i), sin(x * f_i)]`` with ``f_i = max_positions ** (-i / n)``,
    i = 0..num_channels/2 - 1, n = num_channels/2 (or n - 1 with ``endpoint``, so the last frequency is exactly
    1 / max_positions, as EDM's DDPM++ uses). Computed in float32 whatever the autocast dtype.

    Args:
        num_channels: Output width; must be even.
        max_positions: Ratio of the highest to the lowest frequency.
        endpoint: Let the frequency grid include its endpoint 1 / max_positions.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels % 2 or num_channels < 2 + 2 * int(endpoint):
            raise ValueError(
                f"PositionalEmbedding needs an even num_channels >= 2 (4 with endpoint), got {num_channels}"
            )
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1.0 / self.max_positions) ** exponents
        angles = x.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar per sample (Tancik et al. 2020; NCSN++, Song et al. 2021).

    Maps [B] to [B, num_channels] as ``[cos(2 pi f_i x), sin(2 pi f_i x)]`` with fixed ``f_i ~ N(0, scale^2)``.
    The frequencies are a persistent buffer, so a checkpoint restores exactly the same embedding. It holds the
    float32 bit pattern as int32: ``module.to(torch.bfloat16)`` (a frozen teacher kept in the compute dtype) leaves
    integer buffers alone, whereas bf16 frequencies (~16 * N(0, 1)) would move the angles by up to ~0.5 rad.

    Args:
        num_channels: Output width; must be even.
        scale: Standard deviation of the random frequencies.
    """

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        if num_channels % 2 or num_channels < 2:
            raise LitGenError(f"FourierEmbedding needs an even num_channels >= 2, got {num_channels}")
        self.num_channels = num_channels
        freqs = torch.randn(num_channels // 2, dtype=torch.float32) * scale
        self.register_buffer("freqs_bits", freqs.view(torch.int32))

    @property
    def freqs(self) -> Tensor:
        """The float32 frequencies f_i."""
        return self.freqs_bits.view(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        angles = x.to(torch.float32)[:, None] * (2 * math.pi * self.freqs)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def noise_embedding(embedding_type: str, num_channels: int, fourier_scale: float = 16) -> nn.Module:
    """The noise-level map named by ``embedding_type``: "positional" (DDPM++, endpoint grid) or "fourier" (NCSN++,
    frequencies ~ N(0, fourier_scale^2))."""
    if embedding_type == "positional":
        return PositionalEmbedding(num_channels, endpoint=True)
    if embedding_type == "fourier":
        return FourierEmbedding(num_channels, scale=fourier_scale)
    raise LitGenError(f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}, got {embedding_type!r}")


class LabelEmbedding(nn.Module):
    """Class-label table with a NULL row for classifier-free guidance (Ho & Salimans 2022; DiT's LabelEmbedder).

    Rows 0..num_classes-1 are the classes, row ``num_classes`` the NULL class. ``label=None`` embeds every sample
    as NULL. Labels outside [0, num_classes] raise on CPU (index error) and assert on GPU.

    Args:
        num_classes: Number of real classes (> 0).
        num_channels: Embedding width.
        init_std: Standard deviation of the normal initialisation.
    """

    def __init__(self, num_classes: int, num_channels: int, init_std: float = 1.0) -> None:
        super().__init__()
        if num_classes <= 0:
            raise LitGenError(f"LabelEmbedding needs num_classes > 0, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, num_channels)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, label: Tensor | None, batch_size: int) -> Tensor:
        if label is None:
            label = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        return self.table(label.reshape(-1).to(torch.long))


class AuxTimeEmbedding(nn.Module):
    """A second scalar condition per sample (MeanFlow's t − r), added to a net's noise embedding.

    ``features(c_aux)`` (the net's own embedding type), then ``proj`` — zero-initialised, so the sum the net sees
    equals its noise embedding until training moves ``proj``. ``c_aux=None`` means 0 (MeanFlow: r = t).

    Args:
        embedding_type: "positional" or "fourier" (as the net's noise embedding).
        num_channels: width of the features.
        out_channels: width of the embedding it is added to.
        fourier_scale: standard deviation of the Fourier frequencies.
    """

    def __init__(self, embedding_type: str, num_channels: int, out_channels: int, fourier_scale: float = 16) -> None:
        super().__init__()
        self.features = noise_embedding(embedding_type, num_channels, fourier_scale=fourier_scale)
        self.proj = nn.Linear(num_channels, out_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c_aux: Tensor | float | None, batch_size: int, device: torch.device | None = None) -> Tensor:
        c_aux = torch.zeros(batch_size, device=device) if c_aux is None else c_aux
        feats = self.features(noise_vector(c_aux, batch_size, device))
        return self.proj(feats.to(self.proj.weight.dtype))


class GuidanceEmbedding(nn.Module):
    """The guidance weight w per sample (Meng et al. 2023, Sec. 4.1: "w-conditioned" student), added to a net's
    noise embedding.

    Sinusoidal features of w at angular frequencies ``W_SCALE`` · 1 … ``W_SCALE`` / ``W_MAX_POSITIONS`` = 3 … 0.03
    rad per unit of w (``PositionalEmbedding`` with the endpoint grid), then ``proj`` — zero-initialised, so the sum
    the net sees equals its noise embedding at every w until training moves ``proj``. The grid is matched to the
    range guidance weights take (0–10): the slowest feature is near-linear there, the fastest has a period of ~2, so
    the map is smooth in w and *every* feature changes over a typical training range such as [1, 4]. The noise
    embedding's grid (1 … 1e-4, made for c_noise) left three quarters of the features constant over [1, 4]; on the
    digits teacher a student then learned w 2–3× slower at σ = 80 (benchmarks/RESULTS.md, issue 18). Random Fourier
    features of scale 4–16 would oscillate many times over [1, 4] and an unseen w between training draws would land
    on an unrelated feature.
    ``c_guide=None`` returns None (nothing is added).

    Args:
        num_channels: width of the features.
        out_channels: width of the embedding it is added to.
    """

    W_SCALE = 3.0
    W_MAX_POSITIONS = 100

    def __init__(self, num_channels: int, out_channels: int) -> None:
        super().__init__()
        self.features = PositionalEmbedding(num_channels, max_positions=self.W_MAX_POSITIONS, endpoint=True)
        self.proj = nn.Linear(num_channels, out_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, c_guide: Tensor | float | None, batch_size: int, device: torch.device | None = None
    ) -> Tensor | None:
        if c_guide is None:
            return None
        feats = self.features(self.W_SCALE * noise_vector(c_guide, batch_size, device))
        return self.proj(feats.to(self.proj.weight.dtype))
