"""Variance-preserving diffusion with the cosine logSNR schedule, and the ε / x / v prediction algebra.

z_t = α_t x + σ_t ε with α_t² = sigmoid(λ_t), σ_t² = sigmoid(−λ_t) and λ_t = −2 ln tan(a t + b) (Nichol & Dhariwal
2021 cosine schedule, written in logSNR form by Kingma et al. 2021 and Salimans & Ho 2022, "Progressive Distillation
for Fast Sampling of Diffusion Models"). v = α ε − σ x is the v-prediction target (Salimans & Ho 2022, Sec. 4).

The coefficient arguments ``alpha``, ``sigma`` of the algebra below are Python numbers or tensors broadcastable
against the data; a per-sample tensor of shape [B] is aligned with the batch dim automatically.

VE ↔ VP: a VP state z with (α, σ) is the VE state x = z / α with noise level σ_ve = σ / α = exp(−λ / 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, coef_like, compute_dtype, expand_sigma
from lit_gen.diffusion.edm import Net
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

PREDICTIONS = ("eps", "x", "v")
LOSS_WEIGHTINGS: dict[str, str] = {
    "snr_trunc": "max(SNR, 1)·‖x̂ − x‖², truncated SNR weighting (Salimans & Ho 2022, Sec. 4)",
    "v": "‖v̂ − v‖² = (1 + SNR)·‖x̂ − x‖², 'SNR+1' weighting (Salimans & Ho 2022, Sec. 4)",
    "eps": "‖ε̂ − ε‖² = SNR·‖x̂ − x‖², the DDPM loss (Ho et al. 2020, eq. 14)",
}


# --- the cosine schedule in logSNR form ---
def _cosine_ab(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return a, b


def logsnr_cosine(t: Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """λ(t) = −2 ln tan(a t + b), b = arctan(e^{−λ_max/2}), a = arctan(e^{−λ_min/2}) − b.

    The cosine schedule of Nichol & Dhariwal 2021 in logSNR form with λ kept in [λ_min, λ_max], as used by
    Salimans & Ho 2022 (ALGORITHMS.md §1.2). λ(0) = λ_max, λ(1) = λ_min, decreasing in t.
    """
    a, b = _cosine_ab(logsnr_min, logsnr_max)
    return -2.0 * torch.log(torch.tan(a * t + b))


def t_from_logsnr(logsnr: Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """Inverse of ``logsnr_cosine``: t = (arctan(e^{−λ/2}) − b) / a."""
    a, b = _cosine_ab(logsnr_min, logsnr_max)
    return (torch.atan(torch.exp(-0.5 * logsnr)) - b) / a


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """(α, σ) with α² = sigmoid(λ), σ² = sigmoid(−λ), so α² + σ² = 1 and α²/σ² = e^λ = SNR (Kingma et al. 2021)."""
    return torch.sqrt(torch.sigmoid(logsnr)), torch.sqrt(torch.sigmoid(-logsnr))


def sigma_ve_from_logsnr(logsnr: Tensor) -> Tensor:
    """VE noise level of a VP state: σ_ve = σ / α = exp(−λ / 2)."""
    return torch.exp(-0.5 * logsnr)


def logsnr_from_sigma_ve(sigma_ve: Tensor) -> Tensor:
    """λ = −2 ln σ_ve (inverse of ``sigma_ve_from_logsnr``)."""
    return -2.0 * torch.log(sigma_ve)


# --- ε / x / v algebra (z = α x + σ ε, v = α ε − σ x) ---
def x_from_eps(z: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x = (z − σ ε) / α."""
    return (z - coef_like(sigma, z) * eps) / coef_like(alpha, z)


def eps_from_x(z: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """ε = (z − α x) / σ."""
    return (z - coef_like(alpha, z) * x) / coef_like(sigma, z)


def v_from_x_eps(x: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """v = α ε − σ x (Salimans & Ho 2022, Sec. 4)."""
    return coef_like(alpha, x) * eps - coef_like(sigma, x) * x


def x_from_v(z: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """x = α z − σ v (uses α² + σ² = 1)."""
    return coef_like(alpha, z) * z - coef_like(sigma, z) * v


def eps_from_v(z: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """ε = σ z + α v (uses α² + σ² = 1)."""
    return coef_like(sigma, z) * z + coef_like(alpha, z) * v


def ddim_step(
    z_t: Tensor,
    x_hat: Tensor,
    alpha_t: Tensor | float,
    sigma_t: Tensor | float,
    alpha_s: Tensor | float,
    sigma_s: Tensor | float,
) -> Tensor:
    """Deterministic DDIM update t → s: z_s = α_s x̂ + σ_s (z_t − α_t x̂) / σ_t (Song et al. 2021, eq. 12 with
    σ_t = 0; the teacher step of Salimans & Ho 2022, Alg. 2). s = t is the identity; σ_s = 0, α_s = 1 returns x̂.

    In VE coordinates x = z/α, σ_ve = σ/α this is exactly the Euler step of the probability-flow ODE:
    x_s = x̂ + (σ_ve,s / σ_ve,t)(x_t − x̂).
    """
    eps_hat = (z_t - coef_like(alpha_t, z_t) * x_hat) / coef_like(sigma_t, z_t)
    return coef_like(alpha_s, z_t) * x_hat + coef_like(sigma_s, z_t) * eps_hat


def _predictions(
    out: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor, prediction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(x̂, ε̂, v̂) from a raw network output of the given prediction type, each computed directly from the output."""
    if prediction == "x":
        x_hat = out
        eps_hat = eps_from_x(z, x_hat, alpha, sigma)
        v_hat = v_from_x_eps(x_hat, eps_hat, alpha, sigma)
    elif prediction == "eps":
        eps_hat = out
        x_hat = x_from_eps(z, eps_hat, alpha, sigma)
        v_hat = v_from_x_eps(x_hat, eps_hat, alpha, sigma)
    else:
        v_hat = out
        x_hat = x_from_v(z, v_hat, alpha, sigma)
        eps_hat = eps_from_v(z, v_hat, alpha, sigma)
    return x_hat, eps_hat, v_hat


class VP(Configurable):
    """Variance-preserving parameterisation with the cosine logSNR schedule and ε/x/v prediction.

    The network sees z = α x and c_noise = ln(σ_ve)/4 = −λ/8 (EDM's convention, so one network class serves both
    parameterisations) and predicts ε, x or v. ``denoise`` has the same VE interface as ``EDM.denoise``.

    Args:
        prediction: what the network predicts: "eps", "x" or "v" (Salimans & Ho 2022, Sec. 4).
        logsnr_min: logSNR at t = 1 (the noisiest training level).
        logsnr_max: logSNR at t = 0 (the cleanest training level).
        sigma_data: standard deviation of the data; not used by the VP map itself, recorded so that code built on
            a parameterisation (e.g. consistency-model boundary scalings) reads it from either EDM or VP.
        loss_weighting: "snr_trunc" (max(SNR, 1)·x-MSE), "v" (v-MSE) or "eps" (ε-MSE).
        sigma_min: smallest VE noise level used for sampling by default.
        sigma_max: largest VE noise level used for sampling by default.
    """

    kind = "vp"

    def __init__(
        self,
        prediction: str = "v",
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
        sigma_data: float = 0.5,
        loss_weighting: str = "snr_trunc",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise LitGenError(f"unknown VP prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise LitGenError(
                f"unknown VP loss_weighting {loss_weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}"
            )
        if not logsnr_min < logsnr_max:
            raise LitGenError(f"VP needs logsnr_min < logsnr_max, got {logsnr_min} and {logsnr_max}")
        if not 0 < sigma_min < sigma_max:
            raise LitGenError(f"VP needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.prediction = prediction
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.sigma_data = float(sigma_data)
        self.loss_weighting = loss_weighting
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    def logsnr(self, t: Tensor) -> Tensor:
        """λ(t) of this schedule (``logsnr_cosine`` with this object's range)."""
        return logsnr_cosine(t, self.logsnr_min, self.logsnr_max)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """Network noise input ln(σ_ve)/4 = −λ/8, the same convention as ``EDM.c_noise``."""
        return torch.log(sigma) / 4

    def predict(
        self, net: Net, z: Tensor, logsnr: Tensor, label: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the network on the VP state z at logSNR λ ([B]) and return (x̂, ε̂, v̂)."""
        alpha, sigma = alpha_sigma(logsnr)
        out = net(z, -logsnr / 8, label).to(z.dtype)
        return _predictions(out, z, alpha, sigma, self.prediction)

    def denoise(self, net: Net, x: Tensor, sigma: Tensor | float, label: Tensor | None = None) -> Tensor:
        """x̂ from a VE state x = y + σ n: λ = −2 ln σ, α = 1/√(1+σ²), z = α x, then the prediction → x̂.

        ``sigma``: the VE noise level, [B] (or a scalar), σ > 0.
        """
        s = expand_sigma(sigma, x)
        x = x.to(s.dtype)
        alpha = torch.rsqrt(1 + s**2)
        z = append_dims(alpha, x.ndim) * x
        out = net(z, self.c_noise(s), label).to(s.dtype)
        return _predictions(out, z, alpha, s * alpha, self.prediction)[0]

    def sample_sigma(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels as VE sigmas: t ~ U(0, 1), σ_ve = exp(−λ(t)/2). Shape [n]."""
        t = torch.rand(n, device=device, generator=generator, dtype=dtype)
        return sigma_ve_from_logsnr(self.logsnr(t))

    def loss(
        self, net: Net, y: Tensor, label: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample denoising loss, averaged over the non-batch dims. Shape [B].

        t ~ U(0, 1), λ = λ(t), z = α y + σ ε (t drawn first, then ε, both with ``generator``); the weighting is
        ``loss_weighting``: "snr_trunc" max(SNR, 1)·‖x̂ − y‖² (Salimans & Ho 2022, Sec. 4 "truncated SNR"),
        "v" ‖v̂ − v‖² = (1 + SNR)·‖x̂ − y‖², "eps" ‖ε̂ − ε‖² = SNR·‖x̂ − y‖².
        """
        dtype = compute_dtype(y)
        y = y.to(dtype)
        batch = y.shape[0]
        t = torch.rand(batch, device=y.device, generator=generator, dtype=dtype)
        eps = torch.randn(y.shape, device=y.device, generator=generator, dtype=dtype)
        logsnr = self.logsnr(t)
        alpha, sigma = alpha_sigma(logsnr)
        z = coef_like(alpha, y) * y + coef_like(sigma, y) * eps
        x_hat, eps_hat, v_hat = self.predict(net, z, logsnr, label)
        if self.loss_weighting == "snr_trunc":
            weight = append_dims(torch.clamp(torch.exp(logsnr), min=1.0), y.ndim)
            per_elem = weight * (x_hat - y) ** 2
        elif self.loss_weighting == "v":
            per_elem = (v_hat - v_from_x_eps(y, eps, alpha, sigma)) ** 2
        else:
            per_elem = (eps_hat - eps) ** 2
        return per_elem.reshape(batch, -1).mean(dim=1)

    def sigmas_uniform_t(
        self, n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The classic DDIM grid as VE sigmas: t_i = 1 − i/n (i = 0..n), σ_i = exp(−λ(t_i)/2) with λ clipped to
        [logsnr_min, logsnr_max], and the last value exactly 0 (t = 0 is the data). Shape [n + 1], decreasing."""
        if n < 1:
            raise LitGenError(f"the number of sampling steps must be at least 1, got {n}")
        t = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
        logsnr = self.logsnr(t).clamp(self.logsnr_min, self.logsnr_max)
        sigmas = sigma_ve_from_logsnr(logsnr)
        sigmas[-1] = 0.0
        return sigmas.to(device=device, dtype=dtype)
