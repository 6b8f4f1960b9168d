"""VP / cosine logSNR schedule and ε/x/v algebra: ALGORITHMS.md §1.2 invariants (Salimans & Ho 2022)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_gen.diffusion import (
    VP,
    alpha_sigma,
    ddim_step,
    eps_from_v,
    eps_from_x,
    logsnr_cosine,
    logsnr_from_sigma_ve,
    sample_ddim,
    sigma_ve_from_logsnr,
    t_from_logsnr,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)
from lit_gen.errors import LitGenError
from lit_gen.spec import build, describe

F64 = torch.float64


def gaussian_denoiser_ve(x, sigma, mu, s):
    sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return mu + s**2 / (s**2 + sig**2) * (x - mu)


def test_logsnr_cosine_endpoints_inverse_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=F64)
    lam = logsnr_cosine(t)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(t_from_logsnr(lam), t)
    lam2 = logsnr_cosine(t, -10.0, 5.0)
    assert lam2[0].item() == pytest.approx(5.0) and lam2[-1].item() == pytest.approx(-10.0)
    torch.testing.assert_close(t_from_logsnr(lam2, -10.0, 5.0), t)
    # the middle of the default cosine schedule is the familiar α = cos(π t / 2) up to the tiny endpoint offsets
    alpha, _ = alpha_sigma(logsnr_cosine(torch.tensor([0.5], dtype=F64)))
    assert alpha.item() == pytest.approx(math.cos(math.pi / 4), abs=1e-4)


def test_alpha_sigma_and_ve_sigma():
    lam = torch.linspace(-20, 20, 41, dtype=F64)
    alpha, sigma = alpha_sigma(lam)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), lam)
    torch.testing.assert_close(sigma_ve_from_logsnr(lam), sigma / alpha)
    torch.testing.assert_close(logsnr_from_sigma_ve(sigma / alpha), lam)


def _state(batch=5, shape=(3, 4)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g, dtype=F64)
    eps = torch.randn(batch, *shape, generator=g, dtype=F64)
    lam = torch.linspace(-8, 8, batch, dtype=F64)
    alpha, sigma = alpha_sigma(lam)
    z = alpha.reshape(-1, 1, 1) * x + sigma.reshape(-1, 1, 1) * eps
    return x, eps, lam, alpha, sigma, z


def test_conversions_round_trip():
    x, eps, _, alpha, sigma, z = _state()
    torch.testing.assert_close(x_from_eps(z, eps, alpha, sigma), x)
    torch.testing.assert_close(eps_from_x(z, x, alpha, sigma), eps)
    v = v_from_x_eps(x, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha.reshape(-1, 1, 1) * eps - sigma.reshape(-1, 1, 1) * x)
    torch.testing.assert_close(x_from_v(z, v, alpha, sigma), x)
    torch.testing.assert_close(eps_from_v(z, v, alpha, sigma), eps)
    # scalar coefficients work too
    a, s = 0.6, 0.8
    zs = a * x + s * eps
    torch.testing.assert_close(x_from_v(zs, v_from_x_eps(x, eps, a, s), a, s), x)


def test_ddim_same_time_is_identity_and_to_zero_returns_x_hat():
    _, _, _, alpha, sigma, z = _state()
    x_hat = torch.randn_like(z)
    torch.testing.assert_close(ddim_step(z, x_hat, alpha, sigma, alpha, sigma), z)
    torch.testing.assert_close(ddim_step(z, x_hat, alpha, sigma, 1.0, 0.0), x_hat)
    # the exact x̂ and ε of z make DDIM land on α_s x + σ_s ε
    x, eps, _, alpha, sigma, z = _state()
    a_s, s_s = alpha_sigma(torch.full((5,), 3.0, dtype=F64))
    expected = a_s.reshape(-1, 1, 1) * x + s_s.reshape(-1, 1, 1) * eps
    torch.testing.assert_close(ddim_step(z, x, alpha, sigma, a_s, s_s), expected)


def test_vp_ddim_step_is_edm_euler_step_in_x_over_alpha():
    _, _, lam_t, alpha_t, sigma_t, z_t = _state()
    x_hat = torch.randn_like(z_t)
    lam_s = lam_t + torch.linspace(0.5, 4.0, 5, dtype=F64)
    alpha_s, sigma_s = alpha_sigma(lam_s)
    z_s = ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
    b = (-1, 1, 1)
    x_t, sig_t, sig_s = z_t / alpha_t.reshape(b), sigma_t / alpha_t, sigma_s / alpha_s
    euler = x_t + (sig_s - sig_t).reshape(b) * (x_t - x_hat) / sig_t.reshape(b)
    torch.testing.assert_close(z_s / alpha_s.reshape(b), euler)


def test_sample_ddim_matches_a_vp_ddim_chain():
    """sample_ddim in VE coordinates equals the VP z-loop with ddim_step, on the uniform-t DDIM grid."""
    vp = VP()
    mu, s = 0.2, 0.6
    sigmas = vp.sigmas_uniform_t(8, dtype=F64)
    lam = logsnr_from_sigma_ve(sigmas[:-1])
    alphas, sigmas_vp = alpha_sigma(lam)
    alphas = torch.cat([alphas, torch.ones(1, dtype=F64)])
    sigmas_vp = torch.cat([sigmas_vp, torch.zeros(1, dtype=F64)])
    x0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    z = alphas[0] * x0
    for i in range(8):
        x_hat = gaussian_denoiser_ve(z / alphas[i], sigmas[i].expand(4), mu, s)
        z = ddim_step(z, x_hat, alphas[i], sigmas_vp[i], alphas[i + 1], sigmas_vp[i + 1])
    ve = sample_ddim(lambda x, sig, label: gaussian_denoiser_ve(x, sig, mu, s), x0, sigmas)
    torch.testing.assert_close(ve, z)


def test_mse_identities_eps_snr_and_v_one_plus_snr():
    x, _, lam, alpha, sigma, z = _state()
    x_hat = x + 0.1 * torch.randn_like(x)
    eps = eps_from_x(z, x, alpha, sigma)
    eps_hat = eps_from_x(z, x_hat, alpha, sigma)
    v = v_from_x_eps(x, eps, alpha, sigma)
    v_hat = v_from_x_eps(x_hat, eps_hat, alpha, sigma)
    snr = torch.exp(lam).reshape(-1, 1, 1)
    x_mse = (x_hat - x) ** 2
    torch.testing.assert_close((eps_hat - eps) ** 2, snr * x_mse)
    torch.testing.assert_close((v_hat - v) ** 2, (1 + snr) * x_mse)


class RecordingVPNet(torch.nn.Module):
    """Outputs a fixed affine map of its input; records (z, c_noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.4, dtype=F64))
        self.calls = []

    def forward(self, z, c_noise, label):
        self.calls.append((z.detach().clone(), c_noise.detach().clone()))
        return self.w * z + 0.05


def test_loss_weightings_relate_through_snr():
    """Same seed ⇒ same (t, ε); ε-loss = SNR·x-MSE, v-loss = (1+SNR)·x-MSE, snr_trunc = max(SNR,1)·x-MSE."""
    y = torch.randn(6, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    losses, x_mse = {}, {}
    for weighting in ("eps", "v", "snr_trunc"):
        vp = VP(prediction="x", loss_weighting=weighting)
        net = RecordingVPNet()
        losses[weighting] = vp.loss(net, y, generator=torch.Generator().manual_seed(11)).detach()
        z, c_noise = net.calls[-1]
        x_mse[weighting] = (((0.4 * z + 0.05) - y) ** 2).mean(dim=(1, 2))
        lam = -8 * c_noise
    torch.testing.assert_close(x_mse["eps"], x_mse["v"])
    snr = torch.exp(lam)
    assert (snr < 1).any() and (snr > 1).any()  # both branches of the truncation are exercised
    torch.testing.assert_close(losses["eps"], snr * x_mse["eps"])
    torch.testing.assert_close(losses["v"], (1 + snr) * x_mse["v"])
    torch.testing.assert_close(losses["snr_trunc"], torch.clamp(snr, min=1) * x_mse["snr_trunc"])


def test_loss_draws_z_from_the_cosine_schedule():
    vp = VP(prediction="v")
    net = RecordingVPNet()
    y = torch.zeros(4000, 1, dtype=F64)
    vp.loss(net, y, generator=torch.Generator().manual_seed(0))
    z, c_noise = net.calls[-1]
    lam = -8 * c_noise
    t = t_from_logsnr(lam)
    assert t.min() >= 0 and t.max() <= 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.03)  # t ~ U(0, 1)
    _, sigma = alpha_sigma(lam)
    torch.testing.assert_close((z[:, 0] / sigma).std(), torch.tensor(1.0, dtype=F64), atol=0.05, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
@pytest.mark.parametrize("weighting", ["snr_trunc", "v", "eps"])
def test_loss_reproducible_and_differentiable(prediction, weighting):
    vp = VP(prediction=prediction, loss_weighting=weighting)
    net = RecordingVPNet()
    y = torch.randn(4, 3, 2, 2, dtype=F64)
    l1 = vp.loss(net, y, generator=torch.Generator().manual_seed(2))
    l2 = vp.loss(net, y, generator=torch.Generator().manual_seed(2))
    assert l1.shape == (4,)
    torch.testing.assert_close(l1, l2)
    assert not torch.allclose(l1, vp.loss(net, y, generator=torch.Generator().manual_seed(3)))
    l1.mean().backward()
    assert net.w.grad is not None and net.w.grad.abs() > 0


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_denoise_with_exact_gaussian_predictor_gives_d_star(prediction):
    """A network predicting the exact ε/x/v of Gaussian data (written in VP coordinates) → VP.denoise = D*."""
    mu, s = 0.3, 0.8

    def net(z, c_noise, label):
        lam = (-8 * c_noise).reshape(-1, 1)
        a, sg = torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))
        x_hat = mu + a * s**2 / (a**2 * s**2 + sg**2) * (z - a * mu)  # E[y | z], z = a y + sg ε
        eps_hat = (z - a * x_hat) / sg
        return {"x": x_hat, "eps": eps_hat, "v": a * eps_hat - sg * x_hat}[prediction]

    vp = VP(prediction=prediction)
    sigma = torch.logspace(-2, 1.5, 7, dtype=F64)
    x = torch.randn(7, 5, dtype=F64) * torch.sqrt(sigma**2 + s**2).reshape(-1, 1) + mu
    torch.testing.assert_close(vp.denoise(net, x, sigma), gaussian_denoiser_ve(x, sigma, mu, s))


def test_denoise_feeds_alpha_x_and_edm_c_noise():
    vp = VP(prediction="x")
    net = RecordingVPNet()
    x = torch.randn(3, 4, dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 50.0], dtype=F64)
    out = vp.denoise(net, x, sigma)
    z, c_noise = net.calls[-1]
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    torch.testing.assert_close(z, x / torch.sqrt(1 + sigma**2).reshape(-1, 1))
    torch.testing.assert_close(out.detach(), 0.4 * z + 0.05)


def test_sigmas_uniform_t_grid():
    vp = VP()
    g = vp.sigmas_uniform_t(4, dtype=F64)
    assert g.shape == (5,) and g[-1].item() == 0.0
    assert (g[1:] < g[:-1]).all()
    assert g[0].item() == pytest.approx(math.exp(10.0), rel=1e-9)  # λ_min = −20 → σ_ve = e^{10}
    t = torch.tensor([0.75, 0.5, 0.25], dtype=F64)
    torch.testing.assert_close(g[1:4], torch.exp(-logsnr_cosine(t) / 2))
    narrow = VP(logsnr_min=-6.0, logsnr_max=6.0).sigmas_uniform_t(2, dtype=F64)
    assert narrow[0].item() == pytest.approx(math.exp(3.0))


def test_validation_and_configurable():
    with pytest.raises(LitGenError, match="eps, x, v"):
        VP(prediction="score")
    with pytest.raises(LitGenError, match="snr_trunc"):
        VP(loss_weighting="uniform")
    vp = VP(prediction="eps", loss_weighting="eps")
    assert vp.kind == "vp"
    again = build(describe(vp))
    assert isinstance(again, VP) and again.prediction == "eps" and again.init_args == vp.init_args
