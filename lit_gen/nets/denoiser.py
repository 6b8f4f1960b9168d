"""What lit_gen's own denoisers (``UNet``, ``DiT``, ``MLPDenoiser``, ``EDM2UNet``) share: the three entry points of
the net contract, ``forward`` / ``features`` / ``feature_levels`` taking ``(x_in, c_noise, label[, c_aux, c_guide])``,
the optional second time and guidance inputs, and the constructor checks of their common arguments.

``Denoiser`` is a mixin (no ``__init__``, no modules of its own). A net defines ``condition`` (its conditioning
vector from the noise level, the label and the optional inputs) and what it computes from ``(x, cond)``:
``output``, ``features_at`` and ``feature_levels_at``. It calls ``build_optional_conditions`` last in its
constructor, so a net built without them draws the same initial weights as before they existed, and
``add_optional_conditions`` where it adds its noise embedding and its label. The submodules keep the names
``map_aux`` / ``map_guide`` (``embed.AuxTimeEmbedding`` / ``embed.GuidanceEmbedding``), so state dicts, specs and
imported teachers are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_gen.errors import LitGenError
from lit_gen.nets.embed import AuxTimeEmbedding, GuidanceEmbedding


class Denoiser:
    """Mixin of the nets F(x_in, c_noise, label[, c_aux, c_guide]) that take ``c_aux`` (MeanFlow's t − r,
    ``aux_time``) and ``c_guide`` (the guidance weight w, Meng et al. 2023, ``guidance_embed``) through
    zero-initialised embeddings added to the noise embedding.

    A net defines ``condition(x, c_noise, label, c_aux, c_guide)``, the conditioning vector its blocks read, and from
    ``(x, cond)``: ``output`` (F, the shape of ``x``), ``features_at`` (the representation a discriminator head
    reads) and ``feature_levels_at`` (representations at several depths, for the multi-level heads).
    """

    # Recorded in the spec only when on: files written before these options existed describe the same net.
    omit_when_default = ("aux_time", "guidance_embed")
    map_aux: AuxTimeEmbedding | None
    map_guide: GuidanceEmbedding | None

    def build_optional_conditions(
        self,
        aux_time: bool,
        guidance_embed: bool,
        embedding_type: str,
        num_channels: int,
        out_channels: int,
        fourier_scale: float = 16,
    ) -> None:
        """``map_aux`` (features of ``embedding_type``) and ``map_guide``, each ``num_channels`` features mapped to
        the ``out_channels`` of the embedding they are added to, or None when off. Call it last in ``__init__``."""
        self.map_aux = AuxTimeEmbedding(embedding_type, num_channels, out_channels, fourier_scale) if aux_time else None
        self.map_guide = GuidanceEmbedding(num_channels, out_channels) if guidance_embed else None

    def add_optional_conditions(
        self,
        emb: Tensor,
        c_aux: Tensor | None,
        c_guide: Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> Tensor:
        """``emb`` plus the ``c_aux`` embedding (``c_aux=None`` means 0) and the ``c_guide`` one (None adds nothing),
        each cast to ``emb``'s dtype; a net built without an input ignores it."""
        if self.map_aux is not None:
            emb = emb + self.map_aux(c_aux, batch_size, device).to(emb.dtype)
        if self.map_guide is not None and c_guide is not None:
            emb = emb + self.map_guide(c_guide, batch_size, device).to(emb.dtype)
        return emb

    # ------------------------------------------------------------------------------- the net contract
    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        label: Tensor | None = None,
        c_aux: Tensor | None = None,
        c_guide: Tensor | None = None,
    ) -> Tensor:
        """F(x, c_noise, label[, c_aux, c_guide]) with the shape of ``x`` (``label`` is ignored when
        ``num_classes == 0``, ``c_aux`` without ``aux_time``, ``c_guide`` without ``guidance_embed``)."""
        return self.output(x, self.condition(x, c_noise, label, c_aux, c_guide))

    def features(
        self,
        x: Tensor,
        c_noise: Tensor,
        label: Tensor | None = None,
        c_aux: Tensor | None = None,
        c_guide: Tensor | None = None,
    ) -> Tensor:
        """``features_at`` of the net: an intermediate representation for discriminator heads."""
        return self.features_at(x, self.condition(x, c_noise, label, c_aux, c_guide))

    def feature_levels(
        self,
        x: Tensor,
        c_noise: Tensor,
        label: Tensor | None = None,
        c_aux: Tensor | None = None,
        c_guide: Tensor | None = None,
    ) -> list[Tensor]:
        """``feature_levels_at`` of the net: the representations the multi-level discriminator reads."""
        return self.feature_levels_at(x, self.condition(x, c_noise, label, c_aux, c_guide))


def check_dropout(dropout: float) -> None:
    """A dropout probability in [0, 1) (one line otherwise)."""
    if not 0.0 <= dropout < 1.0:
        raise LitGenError(f"dropout must be in [0, 1), got {dropout}")


def check_levels(img_resolution: int, channel_mult: tuple[int, ...]) -> None:
    """At least one U-Net level, and a resolution that halves ``len(channel_mult) - 1`` times (one line otherwise)."""
    levels = len(channel_mult)
    if levels == 0 or img_resolution % (2 ** (levels - 1)):
        raise LitGenError(
            f"img_resolution={img_resolution} must be divisible by 2^(len(channel_mult) - 1) = "
            f"{2 ** max(levels - 1, 0)} (channel_mult={tuple(channel_mult)} needs at least one level)"
        )
