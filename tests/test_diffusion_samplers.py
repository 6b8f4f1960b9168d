"""Samplers against the exact probability-flow ODE of Gaussian data (Karras et al. 2022, eq. 3 / Alg. 1–2)."""

from __future__ import annotations

import pytest
import torch

from lit_gen.diffusion import (
    EDM,
    SAMPLERS,
    SamplerSpec,
    karras_sigmas,
    sample,
    sample_ddim,
    sample_euler,
    sample_heun,
)
from lit_gen.errors import LitGenError

F64 = torch.float64
MU, S = 0.3, 0.7


def d_star(x, sigma, label=None):
    """Exact denoiser of data N(MU, S² I): D*(x; σ) = MU + S²/(S²+σ²)(x − MU)."""
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sig**2) * (x - MU)


def exact_flow(x_start, sigma_start, sigma_end):
    """Probability-flow ODE solution for Gaussian data: x(σ) = MU + (x(σ₀) − MU)·√((S²+σ²)/(S²+σ₀²))."""
    return MU + (x_start - MU) * ((S**2 + sigma_end**2) / (S**2 + sigma_start**2)) ** 0.5


class Counting:
    """Wraps a denoiser; counts calls and checks the σ it receives has shape [B]."""

    def __init__(self, fn=d_star):
        self.fn, self.calls, self.sigmas, self.labels = fn, 0, [], []

    def __call__(self, x, sigma, label):
        assert sigma.shape == (x.shape[0],), sigma.shape
        self.calls += 1
        self.sigmas.append(sigma.clone())
        self.labels.append(label)
        return self.fn(x, sigma, label)


def _errors(sampler, ns, sigma_min=0.002, sigma_max=80.0):
    x0 = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * sigma_max
    ref = exact_flow(x0, sigma_max, sigma_min)
    errs = []
    for n in ns:
        grid = karras_sigmas(n, sigma_min, sigma_max, dtype=F64)[:-1]  # ends at σ_min: smooth ODE all the way
        errs.append((sampler(d_star, x0, grid) - ref).abs().max().item())
    return errs


def test_heun_is_second_order():
    errs = _errors(sample_heun, [8, 16, 32])
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3
    assert errs[2] < 0.05


def test_euler_is_first_order():
    errs = _errors(sample_euler, [16, 32, 64])
    for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
        assert 1.6 < coarse / fine < 2.6


def test_ddim_equals_euler():
    x0 = torch.randn(4, 2, 3, dtype=F64) * 80
    grid = karras_sigmas(10, dtype=F64)
    assert torch.equal(sample_ddim(d_star, x0, grid), sample_euler(d_star, x0, grid))


def test_full_grid_to_zero_matches_exact_solution():
    """On a grid ending at 0 (last step Euler), Heun ends near the exact ODE endpoint x(0), still 2nd order."""
    x0 = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 80
    ref = exact_flow(x0, 80.0, 0.0)
    errs = [(sample_heun(d_star, x0, karras_sigmas(n, dtype=F64)) - ref).abs().max().item() for n in (32, 64)]
    assert errs[1] < 0.01 and errs[0] / errs[1] > 3


def test_euler_last_step_to_zero_returns_the_denoised_value():
    x0 = torch.randn(5, 3, dtype=F64)
    grid = torch.tensor([2.0, 0.0], dtype=F64)
    torch.testing.assert_close(sample_euler(d_star, x0, grid), d_star(x0, torch.full((5,), 2.0, dtype=F64)))


@pytest.mark.parametrize("name", ["euler", "heun", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 7, 18])
def test_nfe_matches_table_and_sigma_is_per_sample(name, steps):
    counter = Counting()
    x0 = torch.randn(3, 4, dtype=F64) * 80
    label = torch.tensor([1, 0, 2])
    SAMPLERS[name].fn(counter, x0, karras_sigmas(steps, dtype=F64), label)
    assert counter.calls == SAMPLERS[name].nfe(steps)
    assert all(lab is label for lab in counter.labels)
    assert counter.sigmas[0][0].item() == 80.0


def test_sampler_table():
    assert set(SAMPLERS) == {"euler", "heun", "ddim", "consistency", "meanflow"}
    assert all(isinstance(spec, SamplerSpec) and spec.description for spec in SAMPLERS.values())
    assert SAMPLERS["heun"].nfe(18) == 35
    assert SAMPLERS["heun"].fn is sample_heun and SAMPLERS["ddim"].fn is sample_ddim


def test_heun_churn_seeded_and_respects_window():
    x0 = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 80
    grid = karras_sigmas(12, dtype=F64)
    plain = sample_heun(d_star, x0, grid)

    def churned(seed, **kw):
        return sample_heun(d_star, x0, grid, s_churn=10.0, generator=torch.Generator().manual_seed(seed), **kw)

    torch.testing.assert_close(churned(1), churned(1))
    assert not torch.allclose(churned(1), churned(2))
    assert not torch.allclose(churned(1), plain)
    # the churn window excludes every σ of the grid → deterministic Heun again
    torch.testing.assert_close(churned(1, s_tmin=100.0, s_tmax=200.0), plain)
    # churn evaluates D at the raised σ̂ = σ(1 + γ), γ = min(S_churn/N, √2 − 1)
    counter = Counting()
    sample_heun(counter, x0, grid, s_churn=3.0, s_tmin=79.0, generator=torch.Generator().manual_seed(0))
    assert counter.sigmas[0][0].item() == pytest.approx(80.0 * 1.25)  # γ = 3/12
    assert counter.sigmas[2][0].item() == pytest.approx(grid[1].item())


def test_sample_statistics_shape_dtype_and_no_grad():
    w = torch.nn.Parameter(torch.tensor(1.0))

    def den(x, sigma, label):
        return w * d_star(x, sigma.to(x.dtype))

    # (Heun needs ~40 steps for 1% accuracy on this Gaussian: at 18 steps the spread is ~5% too wide)
    out = sample(den, (4000, 2), steps=40, sampler="heun", generator=torch.Generator().manual_seed(0))
    assert out.shape == (4000, 2) and out.dtype == torch.float32 and not out.requires_grad
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(S, abs=0.03)


def test_sample_reproducible_and_uses_given_grid():
    g = torch.Generator
    a = sample(d_star, (3, 2), steps=5, sampler="euler", generator=g().manual_seed(4), dtype=F64)
    b = sample(d_star, (3, 2), steps=5, sampler="euler", generator=g().manual_seed(4), dtype=F64)
    assert torch.equal(a, b)
    # explicit grid: x starts at sigmas[0]·N(0, I); Euler to σ = 0 with one step is D*(x; σ₀)
    grid = torch.tensor([3.0, 0.0], dtype=F64)
    out = sample(d_star, (3, 2), sampler="ddim", sigmas=grid, generator=g().manual_seed(4), dtype=F64)
    x0 = torch.randn((3, 2), generator=g().manual_seed(4), dtype=F64) * 3.0
    torch.testing.assert_close(out, d_star(x0, torch.full((3,), 3.0, dtype=F64)))


def test_sample_with_edm_parameterisation_and_labels():
    edm = EDM(sigma_data=S)
    counter = Counting(lambda x, sigma, label: edm.denoise(lambda x_in, c, lab: torch.zeros_like(x_in), x, sigma))
    label = torch.tensor([0, 1, 2])
    out = sample(counter, (3, 5), steps=4, sampler="heun", label=label, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5) and counter.calls == 7
    assert all(torch.equal(lab, label) for lab in counter.labels)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(LitGenError, match="euler.*heun.*ddim"):
        sample(d_star, (2, 2), sampler="dpm++")


def test_bad_grid_shape():
    with pytest.raises(LitGenError):
        sample_euler(d_star, torch.zeros(2, 2), torch.ones(3, 2))
