"""One weighting axis (Kingma & Gao 2023): named w(λ) and p(λ) reproduce today's losses; monotone ⇔ flagged ELBO;
the importance weights w/p are unbiased; the adaptive schedule's state resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion import EDM, VP
from lit_gen.diffusion.weighting import (
    WEIGHTINGS,
    AdaptiveLogSNR,
    CosineT,
    LogNormalSigma,
    UniformLogSNR,
    Weighting,
    build_schedule,
    build_weighting,
    native_objective,
    weighted_loss,
)
from lit_gen.errors import LitGenError
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser

PARAMS = [
    EDM(),
    EDM(sigma_data=0.5, p_mean=-1.8, p_std=1.6),
    *[VP(prediction=p, loss_weighting=w) for p in ("eps", "x", "v") for w in ("snr_trunc", "v", "eps")],
    VP(prediction="v", logsnr_min=-15.0, logsnr_max=12.0),
]


def _net() -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(dim=3, hidden=32, depth=2).double()


@pytest.mark.parametrize("param", PARAMS, ids=repr)
def test_named_weightings_reproduce_todays_losses(param: EDM | VP) -> None:
    net = _net()
    y = torch.randn(256, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = param.loss(net, y, None, generator=torch.Generator().manual_seed(7))
    name, schedule_name = native_objective(param)
    weighting, schedule = build_weighting(name, param), build_schedule(schedule_name, param)
    loss, lam, _ = weighted_loss(param, net, y, None, weighting, schedule, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0.0)
    # The λ draw is the parameterisation's own: EDM's ln σ, VP's t (same generator order).
    if isinstance(param, EDM):
        sigma = param.sample_sigma(256, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        torch.testing.assert_close(lam, -2 * torch.log(sigma))


def test_teacher_default_is_bit_identical_and_named_weighting_matches() -> None:
    y = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    for param in (EDM(p_mean=-1.8, p_std=1.6), VP(prediction="v")):
        default = TeacherDiffusion(net=MLPDenoiser(dim=3, hidden=32, depth=2), param=param)
        assert default.weighting is None and default.noise_schedule is None
        today = param.loss(default.net, y, None, generator=torch.Generator().manual_seed(5))
        assert torch.equal(default.loss(y, None, torch.Generator().manual_seed(5)), today)
        name, schedule = native_objective(param)
        named = TeacherDiffusion(net=default.net, param=param, weighting=name, noise_schedule=schedule)
        torch.testing.assert_close(named.loss(y, None, torch.Generator().manual_seed(5)), today, rtol=2e-5, atol=1e-6)
        # Only the weighting given: the parameterisation's own schedule; the checkpoint section says so.
        only = TeacherDiffusion(net=default.net, param=param, weighting=name)
        torch.testing.assert_close(only.loss(y, None, torch.Generator().manual_seed(5)), today, rtol=2e-5, atol=1e-6)
        assert only.describe()["objective"]["noise_schedule"] == named.describe()["objective"]["noise_schedule"]
        assert "objective" not in default.describe()


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_monotone_weightings_are_flagged_as_elbos(name: str) -> None:
    for param in (EDM(), VP()):
        w = build_weighting(name, param, bias=-2.0)
        lo, hi = (-19.9, 19.9) if isinstance(param, VP) else (-8.7, 12.4)
        lam = torch.linspace(lo, hi, 4001, dtype=torch.float64)
        log_w = w.log_w(lam)
        assert torch.isfinite(log_w).all()
        non_increasing = bool((log_w[1:] - log_w[:-1] <= 1e-12).all())
        assert non_increasing == w.monotone == WEIGHTINGS[name].monotone, name


def test_v_weighting_is_the_closed_form_of_kingma_gao_table_1() -> None:
    # v-MSE with the untruncated cosine schedule: w(λ) = e^{−λ/2}/π; ε-MSE: sech(λ/2)/(2π).
    lam = torch.linspace(-30, 30, 101, dtype=torch.float64)
    v = Weighting("v", logsnr_min=-200.0, logsnr_max=200.0)
    torch.testing.assert_close(v.log_w(lam), -lam / 2 - math.log(math.pi))
    eps = Weighting("eps", logsnr_min=-200.0, logsnr_max=200.0)
    torch.testing.assert_close(eps.log_w(lam), -torch.log(torch.cosh(lam / 2)) - math.log(2 * math.pi))
    edm = Weighting("edm", sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    gauss = torch.distributions.Normal(2.4, 2.4).log_prob(lam)
    torch.testing.assert_close(edm.log_w(lam), gauss + torch.log((torch.exp(-lam) + 0.25) / 0.25))


@pytest.mark.parametrize(
    "schedule",
    [LogNormalSigma(-1.2, 1.2), CosineT(-20.0, 20.0), CosineT(-9.0, 12.0), UniformLogSNR(-9.0, 12.0)],
    ids=repr,
)
def test_noise_schedules_sample_their_density(schedule) -> None:  # noqa: ANN001
    lam = torch.linspace(-60, 60, 240001, dtype=torch.float64)
    density = torch.exp(schedule.log_prob(lam))
    assert abs(torch.trapezoid(density, lam).item() - 1.0) < 1e-3
    draws = schedule.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edges = torch.quantile(draws, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    for q, edge in zip((0.1, 0.3, 0.5, 0.7, 0.9), edges, strict=True):
        cdf = torch.trapezoid(density[lam <= edge], lam[lam <= edge]).item()
        assert abs(cdf - q) < 0.01


def test_importance_weights_are_unbiased_across_schedules() -> None:
    # E_{λ~p}[w(λ)/p(λ) g(λ)] = ∫ w g dλ whatever p: the objective is one point on one axis, p only its estimator.
    w = Weighting("sigmoid", bias=-2.0, logsnr_min=-9.0, logsnr_max=12.0)
    grid = torch.linspace(-9.0, 12.0, 20001, dtype=torch.float64)

    def g(lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(lam + 1.0)

    exact = torch.trapezoid(torch.exp(w.log_w(grid)) * g(grid), grid).item()
    for schedule in (UniformLogSNR(-9.0, 12.0), CosineT(-9.0, 12.0)):
        lam = schedule.sample(400_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        estimate = (w.factor(lam, schedule) * g(lam)).mean().item()
        assert abs(estimate - exact) < 0.01 * exact


def test_adaptive_schedule_follows_the_loss_and_resumes_exactly() -> None:
    a = AdaptiveLogSNR(-10.0, 10.0, bins=8, momentum=0.5)
    lam = torch.linspace(-9.9, 9.9, 800, dtype=torch.float64)
    for _ in range(5):
        a.update(lam, torch.where(lam < 0, 9.0, 1.0))  # the integrand is 9x larger for λ < 0
    probs = a.probs()
    assert abs(probs.sum().item() - 1) < 1e-12
    low, high = probs[:4].sum().item(), probs[4:].sum().item()
    assert low == pytest.approx(0.9 * 0.9 + 0.05, abs=1e-9) and high == pytest.approx(0.9 * 0.1 + 0.05, abs=1e-9)
    grid = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    assert abs(torch.trapezoid(torch.exp(a.log_prob(grid)), grid).item() - 1.0) < 1e-3
    b = AdaptiveLogSNR(-10.0, 10.0, bins=8, momentum=0.5)
    b.load_state_dict(a.state_dict())
    draw_a = a.sample(1000, generator=torch.Generator().manual_seed(3))
    draw_b = b.sample(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draw_a, draw_b) and (draw_a < 0).float().mean() > 0.8


def test_teacher_with_adaptive_schedule_keeps_its_state_in_the_checkpoint() -> None:
    teacher = TeacherDiffusion(
        net=MLPDenoiser(dim=2, hidden=32, depth=2), weighting="sigmoid", weighting_bias=-2.0, noise_schedule="adaptive"
    )
    assert {"noise_schedule.ema", "noise_schedule.seen"} <= set(teacher.state_dict())
    teacher.train()
    before = teacher.noise_schedule.ema.clone()
    teacher.loss(torch.randn(512, 2), None).mean().backward()
    assert not torch.equal(before, teacher.noise_schedule.ema) and teacher.noise_schedule.seen.any()
    teacher.eval()
    frozen = teacher.noise_schedule.ema.clone()
    teacher.loss(torch.randn(512, 2), None)
    assert torch.equal(frozen, teacher.noise_schedule.ema)  # held-out losses do not move p(λ)
    other = TeacherDiffusion(
        net=MLPDenoiser(dim=2, hidden=32, depth=2), weighting="sigmoid", weighting_bias=-2.0, noise_schedule="adaptive"
    )
    other.load_state_dict(teacher.state_dict())
    assert torch.equal(other.noise_schedule.probs(), teacher.noise_schedule.probs())


def test_bad_weighting_and_schedule_are_one_line_errors() -> None:
    with pytest.raises(LitGenError, match="unknown weighting 'snr'"):
        TeacherDiffusion(net=MLPDenoiser(dim=2), weighting="snr")
    with pytest.raises(LitGenError, match="unknown noise_schedule 'lognormal'"):
        TeacherDiffusion(net=MLPDenoiser(dim=2), noise_schedule="lognormal")
    with pytest.raises(LitGenError, match="at least 1 bin"):
        TeacherDiffusion(net=MLPDenoiser(dim=2), noise_schedule="adaptive", adaptive_bins=0)
