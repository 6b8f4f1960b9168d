"""Likelihood maths: for Gaussian data with its exact denoiser the ELBO and the PF-ODE NLL equal their closed forms,
and the ELBO is not below the NLL (lit_gen.diffusion.likelihood)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion.likelihood import negative_elbo, negative_elbo_terms, pf_ode_nll
from lit_gen.errors import LitGenError

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian_denoiser(mu: torch.Tensor, cov: torch.Tensor):  # noqa: ANN201
    """Exact D*(x; σ) = μ + Σ(Σ + σ²I)⁻¹(x − μ) of data N(μ, Σ) (ALGORITHMS.md §1.1 for Σ = s²I)."""
    evals, evecs = torch.linalg.eigh(cov)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        shrink = evals / (evals + sigma[:, None] ** 2)  # [B, D]
        coords = (x - mu) @ evecs
        return mu + (coords * shrink) @ evecs.T

    return denoise, evals, evecs


def closed_form_elbo(y: torch.Tensor, mu: torch.Tensor, s2: float) -> torch.Tensor:
    """−ELBO per sample of the exact model of N(μ, s²I): the λ integral ½∫(s⁴ + σ²d²)/(s² + σ²)² dλ in closed form,
    [ln u − ln(s² + u) − (d² − s²)/(s² + u)] between u = σ_min² and σ_max² (partial fractions), plus the prior and
    reconstruction terms."""
    d2 = (y - mu) ** 2

    def antiderivative(u: float) -> torch.Tensor:
        return math.log(u) - math.log(s2 + u) - (d2 - s2) / (s2 + u)

    diffusion = 0.5 * (antiderivative(SIGMA_MAX**2) - antiderivative(SIGMA_MIN**2)).sum(1)
    prior = (y**2).sum(1) / (2 * SIGMA_MAX**2)
    recon = 0.5 * y.shape[1] * (math.log(2 * math.pi * SIGMA_MIN**2) + 1)
    return prior + diffusion + recon


def closed_form_nll(y: torch.Tensor, mu: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    """The exact ODE flow of N(μ, Σ): per eigen-direction x_σ − μ scales by √((λ_i + σ²)/(λ_i + σ_min²)); the NLL is
    the prior's at σ_max minus the log-Jacobian of that linear map."""
    gain = torch.sqrt((evals + SIGMA_MAX**2) / (evals + SIGMA_MIN**2))
    x_t = mu + (((y - mu) @ evecs) * gain) @ evecs.T
    dim = y.shape[1]
    log_prior = -0.5 * (x_t**2).sum(1) / SIGMA_MAX**2 - 0.5 * dim * math.log(2 * math.pi * SIGMA_MAX**2)
    return -(log_prior + torch.log(gain).sum())


def _data(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mu.numel(), generator=g, dtype=torch.float64)
    return mu + z @ torch.linalg.cholesky(cov).T


def test_elbo_of_the_exact_gaussian_model_matches_its_closed_form() -> None:
    mu, s2 = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.05
    cov = s2 * torch.eye(2, dtype=torch.float64)
    denoise, _, _ = gaussian_denoiser(mu, cov)
    y = _data(5000, mu, cov, seed=0)
    estimate = negative_elbo(
        denoise, y, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(1)
    )
    exact = closed_form_elbo(y, mu, s2)
    diff = estimate - exact
    se = diff.std().item() / math.sqrt(len(y))
    assert se < 0.08  # the check has teeth: 0.08 nats per sample
    assert abs(diff.mean().item()) < 4 * se
    # The population value: ½ ln((1 + s²/σ_min²)/(1 + s²/σ_max²)) per dim for the diffusion term.
    terms = negative_elbo_terms(
        denoise, y, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, generator=torch.Generator().manual_seed(1)
    )
    pop = math.log((1 + s2 / SIGMA_MIN**2) / (1 + s2 / SIGMA_MAX**2))  # ½ · 2 dims
    assert abs(terms["diffusion"].mean().item() - pop) < 5 * se + 0.02


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_pf_ode_nll_of_the_exact_gaussian_model_matches_its_closed_form(trace: str) -> None:
    mu = torch.tensor([0.5, -1.0, 0.25, 0.0], dtype=torch.float64)
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = 0.1 * a @ a.T / 4 + 0.01 * torch.eye(4, dtype=torch.float64)  # full covariance: Hutchinson has variance
    denoise, evals, evecs = gaussian_denoiser(mu, cov)
    y = _data(1000, mu, cov, seed=3)
    nll = pf_ode_nll(
        denoise,
        y,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        steps=48 if trace == "exact" else 24,
        trace=trace,
        generator=torch.Generator(),
    )
    exact = closed_form_nll(y, mu, evals, evecs)
    diff = nll - exact
    if trace == "exact":
        assert diff.abs().max().item() < 5e-3  # RK4's discretisation error, per sample
    else:
        se = diff.std().item() / math.sqrt(len(y))
        assert 0 < se < 0.1 and abs(diff.mean().item()) < 4 * se + 0.03
    # And both are the data's true cross-entropy up to the σ_min smoothing (entropy of N(μ, Σ)).
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()
    assert abs(exact.mean().item() - entropy) < 0.1


def test_elbo_is_not_below_the_nll_and_both_bound_the_entropy() -> None:
    mu, s2 = torch.tensor([1.0, 0.0], dtype=torch.float64), 0.02
    cov = s2 * torch.eye(2, dtype=torch.float64)
    denoise, evals, evecs = gaussian_denoiser(mu, cov)
    y = _data(4000, mu, cov, seed=4)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov).item()
    elbo = closed_form_elbo(y, mu, s2).mean().item()
    nll = closed_form_nll(y, mu, evals, evecs).mean().item()
    assert elbo >= nll >= entropy - 0.03  # 0.03: sampling noise of 4000 points
    # The exact model's gap is the decoder's smoothing: ½ ln(1 + σ_min²/s²) per dim, up to the prior mismatch.
    assert elbo - nll == pytest.approx(2 * 0.5 * math.log(1 + SIGMA_MIN**2 / s2), abs=2e-3)
    # Estimated: a decoder of width 0.05 makes the gap (0.12 nats) larger than the ELBO's Monte Carlo error.
    wide = {"sigma_min": 0.05, "sigma_max": SIGMA_MAX}
    elbo_mc = negative_elbo(denoise, y, **wide, generator=torch.Generator().manual_seed(0))
    nll_ode = pf_ode_nll(denoise, y, **wide)
    se = elbo_mc.std().item() / math.sqrt(len(y))
    assert elbo_mc.mean().item() - nll_ode.mean().item() > 0.12 - 4 * se > 0
    assert abs(nll_ode.mean().item() - entropy) < 0.07
    heun = pf_ode_nll(denoise, y[:2000], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, steps=128, solver="heun")
    rk4 = pf_ode_nll(denoise, y[:2000], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    assert (heun - rk4).abs().mean().item() < 0.03  # two solvers, one flow


def test_bad_arguments_are_one_line_errors() -> None:
    denoise, _, _ = gaussian_denoiser(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    y = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(LitGenError, match="0 < sigma_min < sigma_max"):
        negative_elbo(denoise, y, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(LitGenError, match="unknown trace"):
        pf_ode_nll(denoise, y, sigma_min=0.01, sigma_max=10.0, trace="skilling")
    with pytest.raises(LitGenError, match="unknown ODE solver"):
        pf_ode_nll(denoise, y, sigma_min=0.01, sigma_max=10.0, solver="dopri5")
    with pytest.raises(LitGenError, match="at least 1 step"):
        pf_ode_nll(denoise, y, sigma_min=0.01, sigma_max=10.0, steps=0)
