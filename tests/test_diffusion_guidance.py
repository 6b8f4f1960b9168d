"""Classifier-free guidance and autoguidance (ALGORITHMS.md §1.3)."""

from __future__ import annotations

import pytest
import torch

from lit_gen.diffusion import (
    AutoGuidanceDenoiser,
    CFGDenoiser,
    alpha_sigma,
    eps_from_v,
    eps_from_x,
    guide,
    sample,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)
from lit_gen.errors import LitGenError

F64 = torch.float64
NULL = 10


class ClassDenoiser:
    """A label-dependent toy denoiser: shrinks x towards a class-dependent mean; counts calls and batch sizes."""

    def __init__(self, shift: float = 0.0):
        self.calls, self.batch_sizes, self.labels, self.shift = 0, [], [], shift

    def __call__(self, x, sigma, label):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        self.labels.append(label)
        assert sigma.shape == (x.shape[0],)
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        mean = torch.zeros_like(x) if label is None else label.to(x.dtype).reshape(sig.shape) / 5
        return mean + self.shift + (x - mean) / (1 + sig**2)


def test_guide_formula_and_special_scales():
    c, u = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert guide(c, u, 1.0) is c
    torch.testing.assert_close(guide(c, u, 0.0), u)
    torch.testing.assert_close(guide(c, u, 2.5), c + 1.5 * (c - u))


@pytest.mark.parametrize("scale", [0.0, 1.7, 4.0])
def test_guidance_is_the_same_in_eps_x_and_v_space(scale):
    g = torch.Generator().manual_seed(0)
    x_c, x_u = torch.randn(5, 3, dtype=F64, generator=g), torch.randn(5, 3, dtype=F64, generator=g)
    z = torch.randn(5, 3, dtype=F64, generator=g)
    alpha, sigma = alpha_sigma(torch.linspace(-5, 5, 5, dtype=F64))
    x_g = guide(x_c, x_u, scale)
    e_c, e_u = eps_from_x(z, x_c, alpha, sigma), eps_from_x(z, x_u, alpha, sigma)
    torch.testing.assert_close(x_from_eps(z, guide(e_c, e_u, scale), alpha, sigma), x_g)
    v_c, v_u = v_from_x_eps(x_c, e_c, alpha, sigma), v_from_x_eps(x_u, e_u, alpha, sigma)
    v_g = guide(v_c, v_u, scale)
    torch.testing.assert_close(x_from_v(z, v_g, alpha, sigma), x_g)
    torch.testing.assert_close(eps_from_v(z, v_g, alpha, sigma), guide(e_c, e_u, scale))


def test_cfg_scale_one_is_the_conditional_denoiser_in_one_call():
    den = ClassDenoiser()
    x, sigma, label = torch.randn(4, 3, dtype=F64), torch.full((4,), 2.0, dtype=F64), torch.tensor([0, 1, 2, 3])
    out = CFGDenoiser(den, scale=1.0, null_label=NULL)(x, sigma, label)
    assert den.calls == 1 and den.batch_sizes == [4]
    torch.testing.assert_close(out, ClassDenoiser()(x, sigma, label))


def test_cfg_one_batched_call_with_null_labels():
    den = ClassDenoiser()
    x, sigma, label = torch.randn(4, 3, dtype=F64), torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64), torch.arange(4)
    out = CFGDenoiser(den, scale=3.0, null_label=NULL)(x, sigma, label)
    assert den.calls == 1 and den.batch_sizes == [8]
    assert den.labels[0].tolist() == [0, 1, 2, 3] + [NULL] * 4
    ref = ClassDenoiser()
    expected = guide(ref(x, sigma, label), ref(x, sigma, torch.full_like(label, NULL)), 3.0)
    torch.testing.assert_close(out, expected)


def test_cfg_needs_labels():
    with pytest.raises(LitGenError, match="labels"):
        CFGDenoiser(ClassDenoiser(), scale=2.0, null_label=NULL)(torch.zeros(2, 2), torch.ones(2), None)


def test_cfg_inside_sample():
    den = ClassDenoiser()
    out = sample(
        CFGDenoiser(den, 2.0, NULL), (3, 2), steps=4, label=torch.tensor([1, 2, 3]), generator=torch.Generator()
    )
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert den.calls == 7 and set(den.batch_sizes) == {6}


def test_autoguidance():
    good, bad = ClassDenoiser(), ClassDenoiser(shift=0.25)
    x, sigma, label = torch.randn(4, 3, dtype=F64), torch.full((4,), 1.5, dtype=F64), torch.arange(4)
    # good == bad returns that prediction for any scale
    same = AutoGuidanceDenoiser(good, good, scale=3.0)(x, sigma, label)
    torch.testing.assert_close(same, good(x, sigma, label))
    twin = AutoGuidanceDenoiser(ClassDenoiser(), ClassDenoiser(), scale=3.0)(x, sigma, label)
    torch.testing.assert_close(twin, good(x, sigma, label))
    # x̂_bad + s (x̂_good − x̂_bad): the bad model's 0.25 offset is extrapolated away by (s − 1)·0.25
    out = AutoGuidanceDenoiser(good, bad, scale=3.0)(x, sigma, label)
    torch.testing.assert_close(out, good(x, sigma, label) - 2.0 * 0.25)
    torch.testing.assert_close(AutoGuidanceDenoiser(good, bad, scale=1.0)(x, sigma, None), good(x, sigma, None))


def test_autoguidance_call_counts():
    good, bad = ClassDenoiser(), ClassDenoiser(shift=0.25)
    x, sigma = torch.randn(2, 3, dtype=F64), torch.ones(2, dtype=F64)
    AutoGuidanceDenoiser(good, bad, scale=1.0)(x, sigma, None)  # s = 1: the bad model is not evaluated
    assert (good.calls, bad.calls) == (1, 0)
    AutoGuidanceDenoiser(good, bad, scale=2.0)(x, sigma, None)
    assert (good.calls, bad.calls) == (2, 1)
    AutoGuidanceDenoiser(good, good, scale=2.0)(x, sigma, None)  # the same model twice: one evaluation
    assert good.calls == 3
