"""TrigFlow maths (sCM, Lu & Song 2024; ALGORITHMS.md §10): the exact EDM conversion, the boundary condition, the JVP
tangent in both modes, and d f/dt along the probability-flow ODE of an analytic Gaussian teacher."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion import EDM
from lit_gen.diffusion.trigflow import (
    TrigFlow,
    jvp_time_derivative,
    scm_loss,
    scm_tangent,
    sigma_from_t,
    t_from_sigma,
    trigflow_noise,
)
from lit_gen.errors import LitGenError
from lit_gen.nets import MLPDenoiser, UNet


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A network whose zero-initialised output layer is perturbed, so F is not identically 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return net.eval()


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_converted_edm_teacher_matches_edm_denoiser(kind: str) -> None:
    if kind == "mlp":
        net, x = _randomised(MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16)), torch.randn(64, 2)
    else:
        net = _randomised(UNet(8, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()))
        x = torch.randn(4, 1, 8, 8)
    edm = EDM(sigma_data=0.5)
    trig = TrigFlow.from_teacher(edm)
    sigma = torch.logspace(-2.5, 1.8, x.shape[0])
    x = x * (1 + sigma.view(-1, *([1] * (x.ndim - 1))))
    with torch.no_grad():
        a, b = edm.denoise(net, x, sigma), trig.denoise(net, x, sigma)
    assert a.abs().max() > 0.1  # a real network output, not zeros
    assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max()))


def test_boundary_condition_is_exact() -> None:
    net = _randomised(MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16))
    x = torch.randn(32, 2)
    for conditioning in ("edm", "trigflow"):
        trig = TrigFlow(time_conditioning=conditioning)
        with torch.no_grad():
            assert torch.equal(trig.denoise(net, x, torch.zeros(32)), x)
            assert torch.equal(trig.consistency(net, x, torch.zeros(32)), x)


def test_time_maps_and_sampling_grid() -> None:
    sigma = torch.tensor([0.0, 0.002, 0.5, 80.0, math.inf], dtype=torch.float64)
    t = t_from_sigma(sigma, 0.5)
    assert t[0] == 0 and t[-1] == math.pi / 2 and abs(float(t[2]) - math.pi / 4) < 1e-12
    assert torch.allclose(sigma_from_t(t[:4], 0.5), sigma[:4], rtol=1e-12)
    trig = TrigFlow(sigma_data=0.5)
    assert trig.t_max == pytest.approx(math.atan(160.0))
    grid = trig.sampling_grid(1.1)
    assert grid[0] == 80.0 and grid[-1] == 0.0 and grid[1] == pytest.approx(0.5 * math.tan(1.1))
    with pytest.raises(LitGenError):
        trig.sampling_grid(1.6)
    # The proposal: σ_d tan t = e^τ is log-normal with the given moments (sCM Sec. 4.3).
    t = trig.sample_t(200_000, -1.0, 1.4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_sigma = torch.log(0.5 * torch.tan(t))
    assert abs(float(log_sigma.mean()) + 1.0) < 0.02 and abs(float(log_sigma.std()) - 1.4) < 0.02
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2


class _SmoothNet(torch.nn.Module):
    """A small net whose time path stays in the input dtype (lit_gen's nets embed c_noise in float32 on purpose), so a
    float64 finite difference is an exact reference."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, c: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        c = c.to(x.dtype).view(-1, 1)
        return self.body(torch.cat([x, torch.sin(3 * c), torch.cos(2 * c)], dim=1))


@pytest.mark.parametrize("mode", ["autograd", "finite"])
def test_jvp_tangent_matches_float64_finite_difference(mode: str) -> None:
    net = _SmoothNet().double()
    trig = TrigFlow(time_conditioning="edm")
    gen = torch.Generator().manual_seed(1)
    x_in = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64) * 1.3 + 0.1
    dx = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    dt = torch.cos(t) * torch.sin(t)  # the paper's scaled tangent
    fn = trig.bind(net)
    with torch.no_grad():
        h = 1e-6
        reference = (fn(x_in + h * dx, t + h * dt) - fn(x_in - h * dx, t - h * dt)) / (2 * h)
        if mode == "autograd":
            primal, tangent = jvp_time_derivative(fn, x_in, t, dx, dt, "autograd")
            assert torch.allclose(tangent, reference, rtol=1e-6, atol=1e-8)
            assert torch.allclose(primal, fn(x_in, t), atol=1e-12)
        else:  # float32 network, the recipe's default ε
            fn32 = trig.bind(net.float())
            primal, tangent = jvp_time_derivative(fn32, x_in.float(), t.float(), dx.float(), dt.float(), "finite")
            scale = float(reference.abs().max())
            assert (tangent.double() - reference).abs().max() <= 2e-3 * scale
        assert reference.abs().max() > 0.05  # a real derivative
    with pytest.raises(LitGenError):
        jvp_time_derivative(fn, x_in, t, dx, dt, "reverse")


def test_jvp_through_lit_gen_nets() -> None:
    """torch.func.jvp runs through the UNet (attention via scaled_dot_product_attention) and agrees with the
    finite difference."""
    net = _randomised(UNet(8, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)), 4)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.3)
    trig = TrigFlow()
    gen = torch.Generator().manual_seed(5)
    x_in, dx = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    t = torch.tensor([0.3, 0.8, 1.3])
    dt = torch.cos(t) * torch.sin(t)
    with torch.no_grad():
        _, exact = jvp_time_derivative(trig.bind(net), x_in, t, dx, dt, "autograd")
        _, finite = jvp_time_derivative(trig.bind(net), x_in, t, dx, dt, "finite", eps=1e-2)
    assert exact.abs().max() > 1e-3
    assert (exact - finite).abs().max() <= 0.05 * float(exact.abs().max())


def test_jvp_through_the_unet_under_bf16_autocast() -> None:
    """The tangent pass of sCM/MeanFlow runs under bf16-mixed (the GPU recipes' precision; CPU autocast here):
    plain nn.GroupNorm gave a bf16 output with a float32 tangent under CPU autocast and the next convolution failed
    on mixed dtypes. The bf16 tangent agrees with the float32 one to bf16 accuracy."""
    net = _randomised(UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)), 6)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.3)
    gen = torch.Generator().manual_seed(7)
    x_in, dx = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    t, dt = torch.tensor([0.3, 0.8, 1.3]), torch.tensor([0.2, 0.4, 0.1])
    fn = TrigFlow().bind(net)
    with torch.no_grad():
        _, full = jvp_time_derivative(fn, x_in, t, dx, dt, "autograd")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = jvp_time_derivative(fn, x_in, t, dx, dt, "autograd")
    assert full.abs().max() > 1e-3
    assert (mixed.float() - full).abs().max() <= 0.05 * float(full.abs().max())


# --- an analytic Gaussian teacher: data N(0, s² I), exact denoiser D*(x; σ) = s²/(s² + σ²) x (EDM coordinates) ---
S, SD = 0.8, 0.5


def _gaussian_net(x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """The EDM network F_EDM of the exact Gaussian denoiser, as a function of (c_in x, ln(σ)/4)."""
    sigma = torch.exp(4 * c_noise).view(-1, *([1] * (x_in.ndim - 1)))
    x = x_in * torch.sqrt(sigma**2 + SD**2)  # undo c_in
    d = S**2 / (S**2 + sigma**2) * x
    c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / torch.sqrt(sigma**2 + SD**2)
    return (d - c_skip * x) / c_out


def test_df_dt_along_the_pf_ode_of_a_gaussian_teacher() -> None:
    trig = TrigFlow(sigma_data=SD)
    gen = torch.Generator().manual_seed(2)
    n = 64
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 1.4 + 0.1
    x_t = trigflow_noise(
        S * torch.randn(n, 3, generator=gen, dtype=torch.float64),
        SD * torch.randn(n, 3, generator=gen, dtype=torch.float64),
        t,
    )
    edm = EDM(sigma_data=SD)
    # The converted teacher's denoiser is the exact one, and its PF-ODE velocity follows from it.
    x0_hat = trig.denoised_at(lambda x, s, lab: edm.denoise(_gaussian_net, x, s, lab), x_t, t, None)
    sigma = sigma_from_t(t, SD).view(-1, 1)
    assert torch.allclose(trig.consistency(_gaussian_net, x_t, t), x0_hat, atol=1e-12)
    dxt_dt = trig.velocity_from_denoised(x_t, t, x0_hat)
    cs = torch.cos(t) * torch.sin(t)
    for mode in ("autograd", "finite"):
        F_minus, dF = jvp_time_derivative(
            trig.bind(_gaussian_net), x_t / SD, t, cs.view(-1, 1) * dxt_dt / SD, cs, mode, eps=1e-6
        )
        g = scm_tangent(F_minus, dF, x_t, dxt_dt, t, SD, warmup=1.0, norm_const=None)
        df_dt = g / torch.cos(t).view(-1, 1)
        # Closed form: along the PF-ODE x_EDM(σ) = k √(s² + σ²), so f = x̂ = s² k / √(s² + σ²) and
        # df/dt = −s² k σ / (s² + σ²)^{3/2} · dσ/dt with dσ/dt = σ_d / cos² t.
        k = (x_t / torch.cos(t).view(-1, 1)) / torch.sqrt(S**2 + sigma**2)
        closed = -(S**2) * k * sigma / (S**2 + sigma**2) ** 1.5 * SD / torch.cos(t).view(-1, 1) ** 2
        tol = 1e-9 if mode == "autograd" else 1e-5
        assert (df_dt - closed).abs().max() <= tol * max(1.0, float(closed.abs().max()))


def test_exact_consistency_function_has_zero_tangent_and_loss() -> None:
    """f*(x_t, t) = x_t s/√(s² cos² t + σ_d² sin² t) is constant along the Gaussian PF-ODE: g = 0, loss 0."""
    trig = TrigFlow(sigma_data=SD, time_conditioning="trigflow")

    def f_star_net(x_in: torch.Tensor, c: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        t = c.view(-1, 1)  # time_scale 1: c_noise = t
        x_t = SD * x_in
        f = x_t * S / torch.sqrt(S**2 * torch.cos(t) ** 2 + SD**2 * torch.sin(t) ** 2)
        return (torch.cos(t) * x_t - f) / (SD * torch.sin(t))

    edm = EDM(sigma_data=SD)
    gen = torch.Generator().manual_seed(3)
    t = torch.rand(32, generator=gen, dtype=torch.float64) * 1.4 + 0.1
    x_t = trigflow_noise(
        S * torch.randn(32, 2, generator=gen, dtype=torch.float64),
        SD * torch.randn(32, 2, generator=gen, dtype=torch.float64),
        t,
    )
    x0_hat = trig.denoised_at(lambda x, s, lab: edm.denoise(_gaussian_net, x, s, lab), x_t, t, None)
    dxt_dt = trig.velocity_from_denoised(x_t, t, x0_hat)
    cs = torch.cos(t) * torch.sin(t)
    F_minus, dF = jvp_time_derivative(trig.bind(f_star_net), x_t / SD, t, cs.view(-1, 1) * dxt_dt / SD, cs)
    g = scm_tangent(F_minus, dF, x_t, dxt_dt, t, SD, norm_const=None)
    assert g.abs().max() < 1e-10
    assert scm_loss(F_minus, F_minus, g).abs().max() < 1e-20


def test_tangent_normalisation_and_adaptive_loss() -> None:
    g = scm_tangent(
        torch.ones(4, 3), torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4, 3), torch.full((4,), 0.7), 0.5
    )
    raw = scm_tangent(
        torch.ones(4, 3),
        torch.zeros(4, 3),
        torch.ones(4, 3),
        torch.zeros(4, 3),
        torch.full((4,), 0.7),
        0.5,
        norm_const=None,
    )
    norm = raw.norm(dim=1, keepdim=True)
    assert torch.allclose(g, raw / (norm + 0.1))
    # e^{−w}·L + w is minimised at w = ln L (EDM2's uncertainty weighting): gradient 0 there.
    per = torch.tensor([0.3])
    w = torch.log(per).requires_grad_(True)
    loss = scm_loss(torch.sqrt(per).view(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), w)
    loss.backward()
    assert abs(float(w.grad)) < 1e-6
