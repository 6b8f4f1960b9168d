"""Noise-level and label embeddings (lit_gen.nets.embed)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.nets.embed import FourierEmbedding, LabelEmbedding, PositionalEmbedding, noise_embedding, noise_vector


def test_positional_embedding_values() -> None:
    x = torch.tensor([0.0, 1.0, -1.5])
    emb = PositionalEmbedding(8, max_positions=100)(x)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    freqs = 100.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([(x[:, None] * freqs).cos(), (x[:, None] * freqs).sin()], dim=1))
    # endpoint=True: the lowest frequency is exactly 1 / max_positions.
    end = PositionalEmbedding(8, max_positions=100, endpoint=True)(torch.tensor([50.0]))
    torch.testing.assert_close(end[0, 3], torch.tensor(math.cos(0.5)))
    torch.testing.assert_close(end[0, 0], torch.tensor(math.cos(50.0)))


def test_fourier_embedding_values_and_state() -> None:
    torch.manual_seed(0)
    module = FourierEmbedding(16, scale=3.0)
    x = torch.tensor([0.0, 0.25, -1.0])
    emb = module(x)
    angles = 2 * math.pi * x[:, None] * module.freqs[None]
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], dim=1))
    assert emb.shape == (3, 16)
    assert 1.5 < module.freqs.std() < 6.0  # N(0, scale^2) frequencies
    # Frequencies travel in the state dict and survive a cast of the module to bf16 bit-exactly.
    other = FourierEmbedding(16, scale=3.0)
    assert not torch.equal(other.freqs, module.freqs)
    other.load_state_dict(module.state_dict())
    assert torch.equal(other.freqs, module.freqs)
    other.to(torch.bfloat16)
    assert other.freqs.dtype == torch.float32 and torch.equal(other.freqs, module.freqs)


@pytest.mark.parametrize("cls", [PositionalEmbedding, FourierEmbedding])
def test_embeddings_reject_odd_widths(cls) -> None:
    with pytest.raises(ValueError, match="even"):
        cls(7)


def test_noise_embedding_table() -> None:
    assert isinstance(noise_embedding("positional", 8), PositionalEmbedding)
    assert isinstance(noise_embedding("fourier", 8), FourierEmbedding)
    with pytest.raises(ValueError, match="positional, fourier"):
        noise_embedding("sinusoidal", 8)


def test_noise_vector_broadcasts_scalars_only() -> None:
    assert torch.equal(noise_vector(0.5, 3), torch.full((3,), 0.5))
    assert noise_vector(torch.ones(3, dtype=torch.float64), 3).dtype == torch.float32
    with pytest.raises(ValueError, match="c_noise has 2 entries for a batch of 3"):
        noise_vector(torch.ones(2), 3)


def test_label_embedding_null_row() -> None:
    table = LabelEmbedding(num_classes=4, num_channels=6)
    assert table.table.weight.shape == (5, 6)
    torch.testing.assert_close(table(None, 3), table.table.weight[4].expand(3, 6))
    torch.testing.assert_close(table(torch.tensor([1, 4]), 2), table.table.weight[[1, 4]])
    with pytest.raises(ValueError, match="num_classes > 0"):
        LabelEmbedding(0, 6)
