"""Consistency-model maths (ALGORITHMS.md §4 invariants): boundary condition, iCT schedules, distances, the exact
Gaussian consistency function against exact and Heun teacher steps, multistep sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion import EDM, SAMPLERS
from lit_gen.diffusion.consistency import (
    DISTANCES,
    ConsistencyParam,
    consistency_grid,
    get_distance,
    ict_loss_weight,
    ict_num_scales,
    ict_sigma_probs,
    l2_distance,
    ode_step,
    pseudo_huber_c,
    pseudo_huber_distance,
    sample_consistency,
)
from lit_gen.errors import LitGenError
from lit_gen.nets import MLPDenoiser
from lit_gen.spec import build, describe

F64 = torch.float64


class ExactGaussianF(torch.nn.Module):
    """The network F whose consistency function is exact for data N(0, s² I):
    f*(x, σ) = x √((s² + σ_min²)/(s² + σ²)), so F = (f* − c_skip x)/c_out (0 where c_out = 0, at σ_min)."""

    def __init__(self, param: ConsistencyParam, s: float) -> None:
        super().__init__()
        self.param, self.s = param, s

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        sigma = torch.exp(4 * c_noise).view(-1, *([1] * (x_in.ndim - 1)))
        x = x_in / self.param.c_in(sigma)
        target = exact_f(x, sigma, self.s, self.param.sigma_min)
        c_out = self.param.c_out(sigma)
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        return torch.where(c_out == 0, torch.zeros_like(x), (target - self.param.c_skip(sigma) * x) / safe)


def exact_f(x: torch.Tensor, sigma: torch.Tensor, s: float, sigma_min: float) -> torch.Tensor:
    return x * torch.sqrt((s * s + sigma_min**2) / (s * s + sigma**2))


def exact_ode(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, s: float) -> torch.Tensor:
    """Probability-flow ODE solution for data N(0, s²): x(σ') = x √((s² + σ'²)/(s² + σ²))."""
    return x * torch.sqrt((s * s + sigma_next**2) / (s * s + sigma**2)).view(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(s: float):
    """D*(x; σ) = s²/(s² + σ²) x, the exact denoiser of N(0, s²)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        return x * (s * s / (s * s + sigma**2)).view(-1, *([1] * (x.ndim - 1)))

    return denoise


def test_boundary_condition_holds_for_any_network() -> None:
    param = ConsistencyParam(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    net = MLPDenoiser(dim=3, hidden=16, depth=2)
    torch.nn.init.normal_(net.proj_out.weight, std=10.0)  # a network with large, nonzero output
    x = torch.randn(7, 3) * 5

    def wild(x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        return 1e3 * torch.randn_like(x_in) + 50.0

    for f in (net, wild):
        out = param.denoise(f, x, torch.full((7,), 0.002), None)
        assert torch.equal(out, x)
    s = torch.tensor([0.002, 0.01, 1.0, 80.0], dtype=F64)
    assert param.c_skip(s)[0] == 1.0 and param.c_out(s)[0] == 0.0
    assert torch.all(param.c_out(s)[1:] > 0)
    # Away from σ_min the network matters (the output is not the identity).
    assert not torch.allclose(param.denoise(net, x, 1.0, None), x)


def test_param_is_configurable_and_follows_the_teacher() -> None:
    param = ConsistencyParam.from_teacher(EDM(sigma_data=0.4, sigma_min=0.01, sigma_max=40.0))
    assert (param.sigma_data, param.sigma_min, param.sigma_max) == (0.4, 0.01, 40.0)
    rebuilt = build(describe(param))
    assert isinstance(rebuilt, ConsistencyParam) and describe(rebuilt) == describe(param)
    with pytest.raises(LitGenError, match="EDM teacher"):
        ConsistencyParam.from_teacher(object())
    with pytest.raises(LitGenError, match="sigma_min < sigma_max"):
        ConsistencyParam(sigma_min=1.0, sigma_max=0.5)


def test_grid_is_karras_ascending_with_exact_endpoints() -> None:
    grid = consistency_grid(18)
    assert grid.shape == (18,) and grid[0] == 0.002 and grid[-1] == 80.0
    assert torch.all(grid[1:] > grid[:-1])
    i = 5
    expected = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert math.isclose(float(grid[i]), expected, rel_tol=1e-12)


def test_ict_curriculum_doubles_from_11_to_1281() -> None:
    total = 8000  # K' = 8000 // 8 = 1000 steps per stage
    stages = [ict_num_scales(k, total) for k in range(0, total, 1000)]
    assert stages == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(999, total) == 11 and ict_num_scales(1000, total) == 21
    assert ict_num_scales(10 * total, total) == 1281  # capped at s1 + 1
    with pytest.raises(LitGenError):
        ict_num_scales(0, 0)


def test_ict_curriculum_has_no_floor_on_the_log2() -> None:
    # iCT Sec. 3.4: K' = floor(K / (log2 floor(s1/s0) + 1)); s1/s0 = 100 is not a power of two (log2 = 6.64).
    total, s0, s1 = 12345, 10, 1000
    k_prime = math.floor(total / (math.log2(100) + 1))
    assert k_prime == 1615
    assert ict_num_scales(k_prime - 1, total, s0, s1) == 11 and ict_num_scales(k_prime, total, s0, s1) == 21
    last_stage = [k for k in range(total) if ict_num_scales(k, total, s0, s1) == s1 + 1]
    assert len(last_stage) == total - 7 * k_prime == 1040  # a floored log2 (K' = 1763) would leave 4 steps


def test_ict_sigma_probabilities_are_the_discretised_lognormal() -> None:
    grid = consistency_grid(641)
    p = ict_sigma_probs(grid, -1.1, 2.0)
    assert p.shape == (640,) and torch.all(p > 0) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    # Mass of the interval holding exp(P_mean) is the largest per unit of log σ; far tails are small.
    density = p / torch.log(grid[1:] / grid[:-1])
    peak = float(grid[int(density.argmax())])
    assert 0.2 < peak < 0.5  # e^{-1.1} = 0.33
    # Whole-grid mass = P(σ_min < σ < σ_max) of the log-normal, renormalised: cumulative matches the normal CDF.
    cdf = torch.cumsum(p, 0)
    mid = int((grid < 1.0).sum()) - 1
    z_lo, z_mid, z_hi = ((math.log(v) + 1.1) / 2.0 for v in (0.002, float(grid[mid + 1]), 80.0))
    phi = [0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (z_lo, z_mid, z_hi)]
    assert math.isclose(float(cdf[mid]), (phi[1] - phi[0]) / (phi[2] - phi[0]), rel_tol=1e-9)
    w = ict_loss_weight(grid[:-1], grid[1:])
    assert torch.all(w[:-1] > w[1:])  # shorter intervals near the data weigh more


def test_distances() -> None:
    a, b = torch.randn(4, 3, 8, 8, dtype=F64), torch.randn(4, 3, 8, 8, dtype=F64)
    torch.testing.assert_close(l2_distance(a, b), ((a - b) ** 2).flatten(1).mean(1))
    c = pseudo_huber_c(3 * 8 * 8)
    assert math.isclose(c, 0.00054 * math.sqrt(192))
    norm2 = ((a - b) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(pseudo_huber_distance(a, b), torch.sqrt(norm2 + c * c) - c)
    assert torch.all(pseudo_huber_distance(a, a) == 0)
    # Pseudo-Huber is ~‖a − b‖ for large differences and ~‖a − b‖²/(2c) for tiny ones (on the whole vector).
    tiny = 1e-6 * torch.ones(1, 192, dtype=F64)
    assert math.isclose(float(pseudo_huber_distance(tiny, 0 * tiny)), 192e-12 / (2 * c), rel_tol=1e-4)
    assert set(DISTANCES) == {"l2", "l1", "pseudo_huber", "lpips"}
    with pytest.raises(LitGenError, match="choose one of"):
        get_distance("ssim")


def test_lpips_without_local_weights_names_where_to_put_them(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(LitGenError, match=r"vgg16-397923af\.pth") as err:
        get_distance("lpips")
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value)


@pytest.mark.parametrize("s", [0.5, 1.3])
def test_exact_consistency_function_gives_zero_cd_loss_with_the_exact_ode_step(s: float) -> None:
    """f*(x_{n+1}, σ_{n+1}) = f*(Φ(x_{n+1}; σ_{n+1} → σ_n), σ_n) on every interval of the grid (float64)."""
    param = ConsistencyParam(sigma_data=0.5)
    net = ExactGaussianF(param, s)
    grid = consistency_grid(18)
    n = torch.arange(17)
    sigma, sigma_next = grid[n], grid[n + 1]
    y = s * torch.randn(17, 4, dtype=F64)
    x_next = y + sigma_next[:, None] * torch.randn(17, 4, dtype=F64)
    x_n = exact_ode(x_next, sigma_next, sigma, s)
    online = param.denoise(net, x_next, sigma_next)
    target = param.denoise(net, x_n, sigma)
    assert torch.all(l2_distance(online, target) < 1e-28)
    # ... and f* really is f built by the parameterisation: at σ_max it maps to the σ_min-marginal scale.
    torch.testing.assert_close(online, exact_f(x_next, sigma_next[:, None], s, 0.002))


def test_heun_teacher_step_error_is_third_order() -> None:
    """With the Heun step of the exact denoiser the CD mismatch is O(Δσ³) per interval (Euler: O(Δσ²))."""
    s = 0.5
    param = ConsistencyParam(sigma_data=0.5)
    net = ExactGaussianF(param, s)
    x = torch.randn(64, 2, dtype=F64) * 1.2
    sigma = torch.full((64,), 1.0, dtype=F64)

    def mismatch(h: float, solver: str) -> float:
        x_hat = ode_step(gaussian_denoiser(s), x, sigma, sigma - h, None, solver)
        a, b = param.denoise(net, x, sigma), param.denoise(net, x_hat, sigma - h)
        return float((a - b).abs().max())

    for solver, order in (("heun", 3), ("euler", 2)):
        ratio = mismatch(0.1, solver) / mismatch(0.05, solver)
        assert 2**order * 0.8 < ratio < 2**order * 1.25, (solver, ratio)
    assert mismatch(0.05, "heun") < 1e-4
    with pytest.raises(LitGenError, match="choose one of"):
        ode_step(gaussian_denoiser(s), x, sigma, sigma, None, "rk4")


def test_multistep_sampler_follows_cm_algorithm_1() -> None:
    calls: list[float] = []

    def f(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        calls.append(float(sigma[0]))
        assert sigma.shape == (x.shape[0],)
        return torch.zeros_like(x)  # f ≡ 0: after each step x is exactly the noise added at that σ

    x0 = torch.randn(5000, 2, dtype=F64) * 80
    g = torch.Generator().manual_seed(0)
    out = sample_consistency(f, x0, torch.tensor([80.0, 3.0, 0.5, 0.0], dtype=F64), None, generator=g)
    assert calls == [80.0, 3.0, 0.5]  # the trailing 0 is not evaluated: K points, K NFE
    assert torch.all(out == 0)
    spec = SAMPLERS["consistency"]
    assert spec.fn is sample_consistency and spec.nfe(3) == 3 and spec.stochastic

    # With the identity f, the last step returns its input plus √(σ² − σ_min²) noise: check the noise scale.
    def identity(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        return x

    out = sample_consistency(identity, torch.zeros(20000, 1, dtype=F64), torch.tensor([80.0, 2.0, 0.0]), None)
    assert math.isclose(float(out.std()), math.sqrt(4.0 - 0.002**2), rel_tol=0.03)
    # Same generator seed, same samples.
    a = sample_consistency(
        identity, x0, torch.tensor([80.0, 1.0, 0.0]), None, generator=torch.Generator().manual_seed(3)
    )
    b = sample_consistency(
        identity, x0, torch.tensor([80.0, 1.0, 0.0]), None, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b)
    with pytest.raises(LitGenError, match="descending"):
        sample_consistency(identity, x0, torch.tensor([1.0, 2.0]), None)
