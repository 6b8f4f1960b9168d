"""DiT specifics: DiT-S/2 size, patch order, 2-D sin-cos positions, adaLN-Zero start."""

from __future__ import annotations

import pytest
import torch

from lit_gen.nets import DiT
from lit_gen.nets.dit import sincos_pos_embed_2d


def test_dit_s2_size() -> None:
    net = DiT(img_resolution=32, in_channels=3)  # DiT-S/2 defaults: hidden 384, depth 12, 6 heads
    assert net.pos_embed.shape == (1, 256, 384)
    assert 32.4e6 < sum(p.numel() for p in net.parameters()) < 32.6e6


def test_unpatchify_inverts_patch_order() -> None:
    """Token t covers patch (t // g, t % g) and PatchEmbed's row-major flatten agrees with unpatchify."""
    net = DiT(img_resolution=8, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2)
    x = torch.randn(3, 2, 8, 8)
    g, p = 4, 2
    tokens = x.reshape(3, 2, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(3, g * g, p * p * 2)
    torch.testing.assert_close(net.unpatchify(tokens), x)
    # PatchEmbed puts the patch at (row i, col j) into token i * g + j.
    marker = torch.zeros(1, 2, 8, 8)
    marker[..., 2 * p, 3 * p] = 1.0
    embedded = net.x_embedder(marker) - net.x_embedder(torch.zeros_like(marker))
    assert (embedded[0].abs().sum(-1) > 1e-4).nonzero().flatten().tolist() == [2 * g + 3]


def test_sincos_positions_are_distinct_and_fixed() -> None:
    pos = sincos_pos_embed_2d(16, 4)
    assert pos.shape == (16, 16)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1
    net = DiT(img_resolution=8, in_channels=1, hidden_size=16, depth=1, num_heads=2)
    assert "pos_embed" not in dict(net.named_parameters()) and "pos_embed" not in net.state_dict()


def test_blocks_start_as_identity() -> None:
    net = DiT(img_resolution=8, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=2)
    x = torch.randn(2, 1, 8, 8)
    tokens = net.features(x, torch.zeros(2))
    torch.testing.assert_close(tokens, net.x_embedder(x) + net.pos_embed)


def test_bad_shapes_fail_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(img_resolution=9, in_channels=1)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(img_resolution=8, in_channels=1, hidden_size=30, num_heads=4)
