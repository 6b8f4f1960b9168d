"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), assembled from timm's patch embedding, attention and MLP blocks.

As in the paper (Sec. 3.2 and Fig. 3): patchify, fixed 2-D sin-cos position embedding, ``depth`` transformer
blocks whose LayerNorms (no affine) are modulated by a scale, shift and gate regressed from the conditioning
vector c = embed(c_noise) + embed(label), with the regression layers zero-initialised so every block starts as the
identity; then a modulated LayerNorm, a zero-initialised linear layer and unpatchify. The output has the input's
shape (no learned variance channels: EDM-style training needs none). Sizes of the paper's Table 1: DiT-S
(hidden 384, depth 12, heads 6), DiT-B (768, 12, 12), DiT-L (1024, 24, 16), DiT-XL (1152, 28, 16).
"""

from __future__ import annotations

import functools

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.nets.denoiser import Denoiser, check_dropout
from lit_gen.nets.embed import (
    LabelEmbedding,
    PositionalEmbedding,
    noise_embedding,
    noise_vector,
)
from lit_gen.spec import Configurable

NOISE_FREQ_CHANNELS = 256  # width of the sinusoidal noise features before the MLP (DiT's frequency_embedding_size)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size^2, embed_dim] (MAE / DiT): half the channels encode the
    row, half the column, each with the 1-D sinusoidal map of ``PositionalEmbedding`` (10000 max period)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    embed_1d = PositionalEmbedding(embed_dim // 2)
    return torch.cat([embed_1d(rows.reshape(-1)), embed_1d(cols.reshape(-1))], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample [B, D] scale and shift broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (DiT Fig. 3, right): gated residual attention and MLP branches."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu_tanh = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=gelu_tanh, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(Denoiser, Configurable, nn.Module):
    """Diffusion Transformer denoiser F(x, c_noise, label) with adaLN-Zero (Peebles & Xie 2023).

    Input and output are [B, C, H, W] with H = W = ``img_resolution``. Tokens are ``patch_size`` x ``patch_size``
    patches. A fresh network returns exactly zero (zero-initialised adaLN regressions and final layer).

    Args:
        img_resolution: Height and width of the images; must be divisible by ``patch_size``.
        in_channels: Image channels at the input.
        out_channels: Channels of the output; None means ``in_channels``.
        patch_size: Side of the square patches; the sequence has (img_resolution / patch_size)^2 tokens.
        hidden_size: Token width (DiT-S 384, DiT-B 768, DiT-L 1024, DiT-XL 1152).
        depth: Number of transformer blocks.
        num_heads: Attention heads per block; must divide ``hidden_size``.
        mlp_ratio: Hidden width of each block's MLP as a multiple of ``hidden_size``.
        num_classes: Number of classes for class conditioning; 0 = unconditional (labels are ignored).
        dropout: Dropout probability after the attention projection and in the MLP (the paper uses none).
        embedding_type: Noise-level features before the embedding MLP, "positional" or "fourier".
        aux_time: Take a second time input ``c_aux`` (MeanFlow's t − r) through a zero-initialised embedding
            (``embed.AuxTimeEmbedding``) added to the conditioning vector; off by default.
        guidance_embed: Take the guidance weight ``c_guide`` (a w-conditioned distilled student, Meng et al. 2023)
            through a zero-initialised embedding (``embed.GuidanceEmbedding``) added to the conditioning vector.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        embedding_type: str = "positional",
        aux_time: bool = False,
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        if img_resolution % patch_size:
            raise LitGenError(f"img_resolution={img_resolution} must be divisible by patch_size={patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise LitGenError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} and by 4 (2-D sin-cos)"
            )
        check_dropout(dropout)
        out_channels = in_channels if out_channels is None else out_channels
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.feature_dim = hidden_size
        self.grid_size = img_resolution // patch_size

        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False)
        self.map_noise = noise_embedding(embedding_type, NOISE_FREQ_CHANNELS)
        self.t_embedder = nn.Sequential(
            nn.Linear(NOISE_FREQ_CHANNELS, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = LabelEmbedding(num_classes, hidden_size, init_std=0.02) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self._init_weights()
        # After the init above, so it does not touch them.
        self.build_optional_conditions(aux_time, guidance_embed, embedding_type, NOISE_FREQ_CHANNELS, hidden_size)

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) noise MLP, zero adaLN and final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        for layer in [*zero, self.final_adaLN_modulation[-1], self.final_linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(
        self, x: Tensor, c_noise: Tensor, label: Tensor | None, c_aux: Tensor | None, c_guide: Tensor | None
    ) -> Tensor:
        """The adaLN conditioning vector c [B, hidden_size]: embedded noise level (+ aux, guide, label)."""
        freqs = self.map_noise(noise_vector(c_noise, x.shape[0], x.device))
        c = self.t_embedder(freqs.to(self.t_embedder[0].weight.dtype))
        c = self.add_optional_conditions(c, c_aux, c_guide, x.shape[0], x.device)
        if self.y_embedder is not None:
            c = c + self.y_embedder(label, x.shape[0])
        return c

    def _tokens(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return h

    def features_at(self, x: Tensor, c: Tensor) -> Tensor:
        """Token features after the last block, before the final layer: [B, (img_resolution/patch_size)^2,
        feature_dim]."""
        return self._tokens(x, c)

    def feature_levels_at(self, x: Tensor, c: Tensor) -> list[Tensor]:
        """Token features after blocks ⌈depth/3⌉, ⌈2·depth/3⌉ and depth (deduplicated): [B, T, feature_dim] each."""
        depth = len(self.blocks)
        taps = sorted({max(1, -(-depth // 3)), max(1, -(-2 * depth // 3)), depth})
        h = self.x_embedder(x) + self.pos_embed
        levels = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i in taps:
                levels.append(h)
        return levels

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, T, p*p*C] tokens back to [B, C, H, W] images."""
        b, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def output(self, x: Tensor, c: Tensor) -> Tensor:
        """F with the shape of ``x``: the blocks, the adaLN-modulated final layer, unpatchified."""
        h = self._tokens(x, c)
        shift, scale = self.final_adaLN_modulation(c).chunk(2, dim=1)
        return self.unpatchify(self.final_linear(modulate(self.norm_final(h), shift, scale)))
