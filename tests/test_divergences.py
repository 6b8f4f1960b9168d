"""The f-divergence table (ALGORITHMS.md §5 invariants): h(r) = f''(r)·r², weights at logit 0, normalisation."""

from __future__ import annotations

import pytest
import torch

from lit_gen.errors import LitGenError
from lit_gen.methods.divergences import (
    DIVERGENCES,
    alpha_divergence,
    density_ratio,
    get_divergence,
    normalized_weights,
    ratio_bin_means,
)

ALL = [*DIVERGENCES.values(), *(alpha_divergence(a) for a in (-0.5, 0.3, 0.5, 2.0))]
IDS = [d.name for d in ALL]


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_h_is_f_second_derivative_times_r_squared(div) -> None:
    r = torch.logspace(-2, 2, 41, dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(div.f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(d2f * r.detach() ** 2, div.h(r.detach()), rtol=1e-9, atol=1e-12)
    assert abs(float(div.f(torch.ones((), dtype=torch.float64)))) < 1e-12  # f(1) = 0
    assert bool((d2f > 0).all())  # convex


@pytest.mark.parametrize("div", ALL, ids=IDS)
def test_logit_zero_gives_equal_weights_and_normalised_mean_is_one(div) -> None:
    r = density_ratio(torch.zeros(16))
    assert torch.equal(r, torch.ones(16))
    torch.testing.assert_close(normalized_weights(div.h(r)), torch.ones(16, dtype=torch.float32), atol=1e-5, rtol=0)
    logits = torch.randn(257, generator=torch.Generator().manual_seed(0)) * 2
    w = normalized_weights(div.h(density_ratio(logits)))
    assert w.dtype == torch.float32
    assert abs(float(w.mean()) - 1.0) < 1e-5
    assert bool((w > 0).all())


def test_reverse_kl_weight_is_identically_one() -> None:
    logits = torch.linspace(-30, 30, 101)
    w = normalized_weights(DIVERGENCES["rkl"].h(density_ratio(logits)))
    torch.testing.assert_close(w, torch.ones(101), atol=1e-5, rtol=0)
    assert not DIVERGENCES["rkl"].needs_ratio and DIVERGENCES["js"].needs_ratio


def test_js_weights_in_open_unit_interval_and_increasing() -> None:
    r = torch.logspace(-3, 3, 200, dtype=torch.float64)
    h = DIVERGENCES["js"].h(r)
    assert bool(((h > 0) & (h < 1)).all())
    assert bool((h.diff() > 0).all())
    # The other weights are monotone the documented way: fkl/jeffreys/hellinger up, softened-RKL down.
    for name in ("fkl", "jeffreys", "hellinger"):
        assert bool((DIVERGENCES[name].h(r).diff() > 0).all()), name
    assert bool((DIVERGENCES["softened_rkl"].h(r).diff() < 0).all())


def test_density_ratio_clamps_in_float32() -> None:
    logits = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0], dtype=torch.bfloat16, requires_grad=True)
    r = density_ratio(logits, logit_clip=10.0, ratio_min=0.1, ratio_max=20.0)
    assert r.dtype == torch.float32 and not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([0.1, 0.3679, 1.0, 2.7188, 20.0]), atol=2e-3, rtol=1e-2)


def test_normalisation_is_global_when_reduced_across_ranks() -> None:
    h = torch.rand(10, generator=torch.Generator().manual_seed(1)) + 0.1
    a, b = h[:4], h[4:]

    def over_two_ranks(mine: torch.Tensor, other: torch.Tensor):
        other_stats = torch.stack([other.sum(), torch.tensor(float(other.numel()))])
        return lambda stats: stats + other_stats

    wa = normalized_weights(a, over_two_ranks(a, b))
    wb = normalized_weights(b, over_two_ranks(b, a))
    torch.testing.assert_close(torch.cat([wa, wb]), normalized_weights(h))


def test_ratio_bin_means() -> None:
    ratio = torch.tensor([1.0, 3.0, 2.0, 4.0, 10.0])
    position = torch.tensor([0.0, 0.1, 0.5, 0.6, 1.0])  # bins of width 0.5: [0, 0.5) and [0.5, 1]
    sums, counts = ratio_bin_means(ratio, position, bins=2)
    assert sums.tolist() == [4.0, 16.0] and counts.tolist() == [2.0, 3.0]


def test_unknown_divergence_and_bad_alpha_are_user_errors() -> None:
    with pytest.raises(LitGenError, match="unknown divergence 'kl2'.*js"):
        get_divergence("kl2")
    with pytest.raises(LitGenError, match="alpha must not be 0 or 1"):
        get_divergence("alpha", alpha=1.0)
    assert get_divergence("alpha", alpha=0.25).h(torch.tensor(16.0)).item() == pytest.approx(2.0)
