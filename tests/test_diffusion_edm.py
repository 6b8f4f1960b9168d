"""EDM parameterisation: ALGORITHMS.md §1.1 invariants (Karras et al. 2022, Table 1 and eq. 7)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion import EDM
from lit_gen.errors import LitGenError
from lit_gen.spec import build, describe

F64 = torch.float64


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """Exact posterior mean for data N(mu, s² I): D*(x; σ) = mu + s²/(s²+σ²)(x − mu)."""
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return mu + s**2 / (s**2 + sig**2) * (x - mu)


def zero_net(x_in, c_noise, label):
    return torch.zeros_like(x_in)


class RecordingNet(torch.nn.Module):
    """F = w · x_in + b (so D is differentiable in w, b); records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(-0.1, dtype=F64))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x_in, c_noise, label):
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone(), label))
        return self.w * x_in + self.b


def test_boundary_values_at_tiny_sigma():
    edm = EDM()
    tiny = torch.tensor([1e-12], dtype=F64)
    assert edm.c_skip(tiny).item() == pytest.approx(1.0, abs=1e-15)
    assert edm.c_out(tiny).item() == pytest.approx(1e-12, rel=1e-6)  # ≈ σ, → 0
    huge = torch.tensor([1e8], dtype=F64)
    assert edm.c_skip(huge).item() < 1e-16
    assert edm.c_out(huge).item() == pytest.approx(edm.sigma_data, rel=1e-9)


def test_coefficients_at_sigma_data():
    edm = EDM(sigma_data=0.5)
    s = torch.tensor([0.5], dtype=F64)
    assert edm.c_skip(s).item() == pytest.approx(0.5)
    assert edm.c_out(s).item() == pytest.approx(0.5 / math.sqrt(2))
    assert edm.c_in(s).item() == pytest.approx(1 / (0.5 * math.sqrt(2)))
    assert edm.c_noise(torch.tensor([math.e**4], dtype=F64)).item() == pytest.approx(1.0)
    # unit-variance network input for data of std σ_d: Var(c_in (y + σ n)) = c_in² (σ_d² + σ²) = 1
    sig = torch.logspace(-3, 2, 20, dtype=F64)
    torch.testing.assert_close(edm.c_in(sig) ** 2 * (0.25 + sig**2), torch.ones_like(sig))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 0.13])
def test_loss_weight_times_c_out_squared_is_one(sigma_data):
    edm = EDM(sigma_data=sigma_data)
    sig = torch.logspace(-3, 2, 50, dtype=F64)
    torch.testing.assert_close(edm.loss_weight(sig) * edm.c_out(sig) ** 2, torch.ones_like(sig))


def test_zero_F_is_the_optimal_denoiser_for_gaussian_data_of_std_sigma_data():
    edm = EDM(sigma_data=0.5)
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    sigma = torch.logspace(-2, 1.5, 6, dtype=F64)
    d = edm.denoise(zero_net, x, sigma)
    torch.testing.assert_close(d, gaussian_denoiser(x, sigma, mu=0.0, s=0.5))


def test_denoise_is_eq7_and_feeds_the_net_c_in_x_and_c_noise():
    edm = EDM(sigma_data=0.7)
    net = RecordingNet()
    x = torch.randn(3, 2, 5, dtype=F64)
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=F64)
    label = torch.tensor([0, 2, 1])
    d = edm.denoise(net, x, sigma, label)
    x_in, c_noise, seen_label = net.calls[-1]
    sb = sigma.reshape(-1, 1, 1)
    c_in = 1 / torch.sqrt(sigma**2 + 0.49)
    torch.testing.assert_close(x_in, c_in.reshape(-1, 1, 1) * x)
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    assert c_noise.shape == (3,)
    assert torch.equal(seen_label, label)
    f = 0.3 * x_in - 0.1
    expected = 0.49 / (sb**2 + 0.49) * x + sb * 0.7 / torch.sqrt(sb**2 + 0.49) * f
    torch.testing.assert_close(d, expected.detach())


def test_sample_sigma_is_lognormal_and_seeded():
    edm = EDM(p_mean=-1.2, p_std=1.2)
    a = edm.sample_sigma(200_000, generator=torch.Generator().manual_seed(0))
    b = edm.sample_sigma(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == (200_000,) and (a > 0).all()
    assert torch.log(a).mean().item() == pytest.approx(-1.2, abs=0.02)
    assert torch.log(a).std().item() == pytest.approx(1.2, abs=0.02)


def test_loss_is_weighted_mse_on_the_sampled_noise():
    """Recover σ and n from what the network saw, and recompute λ(σ)‖D − y‖² by hand."""
    edm = EDM(sigma_data=0.5)
    net = RecordingNet()
    y = torch.randn(5, 3, 4, dtype=F64)
    loss = edm.loss(net, y, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (5,)
    x_in, c_noise, _ = net.calls[-1]
    sigma = torch.exp(4 * c_noise)
    sb = sigma.reshape(-1, 1, 1)
    x = x_in * torch.sqrt(sb**2 + 0.25)
    d = 0.25 / (sb**2 + 0.25) * x + sb * 0.5 / torch.sqrt(sb**2 + 0.25) * (0.3 * x_in - 0.1)
    lam = (sb**2 + 0.25) / (sb * 0.5) ** 2
    expected = (lam * (d - y) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(loss.detach(), expected)
    # λ c_out² = 1: the same number is the plain MSE of F against its target (y − c_skip x)/c_out
    f_target = (y - 0.25 / (sb**2 + 0.25) * x) / (sb * 0.5 / torch.sqrt(sb**2 + 0.25))
    torch.testing.assert_close(loss.detach(), ((0.3 * x_in - 0.1 - f_target) ** 2).mean(dim=(1, 2)))


def test_loss_reproducible_and_differentiable():
    edm = EDM()
    net = RecordingNet()
    y = torch.randn(4, 2, 3, 3, dtype=F64)
    l1 = edm.loss(net, y, generator=torch.Generator().manual_seed(7))
    l2 = edm.loss(net, y, generator=torch.Generator().manual_seed(7))
    l3 = edm.loss(net, y, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(l1, l2)
    assert not torch.allclose(l1, l3)
    l1.mean().backward()
    assert net.w.grad is not None and net.w.grad.abs() > 0
    assert net.b.grad is not None and net.b.grad.abs() > 0


def test_loss_float32_input_and_1d_data():
    edm = EDM()
    y = torch.randn(8, 2)
    loss = edm.loss(zero_net, y, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (8,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_scalar_sigma_broadcasts():
    edm = EDM()
    x = torch.randn(3, 4, dtype=F64)
    d_scalar = edm.denoise(zero_net, x, 2.0)
    d_vec = edm.denoise(zero_net, x, torch.full((3,), 2.0, dtype=F64))
    torch.testing.assert_close(d_scalar, d_vec)


def test_configurable_round_trip_and_validation():
    edm = EDM(sigma_data=1.0, p_mean=-1.1)
    assert edm.kind == "edm"
    spec = describe(edm)
    assert spec["init_args"]["sigma_data"] == 1.0 and spec["init_args"]["sigma_max"] == 80.0
    again = build(spec)
    assert isinstance(again, EDM) and again.init_args == edm.init_args
    with pytest.raises(LitGenError):
        EDM(sigma_min=1.0, sigma_max=0.5)
