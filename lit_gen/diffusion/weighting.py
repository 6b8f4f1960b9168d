"""One weighting axis for every teacher loss: w(λ) and p(λ) over log-SNR λ (Kingma & Gao 2023).

Kingma & Gao 2023, "Understanding Diffusion Objectives as the ELBO in Simple Data Augmentation", write every
diffusion loss as a weighted integral over λ = log SNR = log(α²/σ²) (their weighted loss after the change of
variables from t to λ; equation numbers below follow the arXiv v1 numbering and are [unverified]):

    L_w(x) = ½ E_{ε ~ N(0, I), λ ~ p(λ)} [ w(λ) / p(λ) · ‖ε̂_θ(z_λ; λ) − ε‖² ],     z_λ = α_λ x + σ_λ ε,

where w(λ) is the *weighting* and p(λ) the *noise distribution* (importance distribution of λ; p(λ) = −dt/dλ for
the time-uniform schedules). w ≡ 1 is the VLB (ELBO) of VDM (Kingma et al. 2021, eq. 17 in λ form);
their main result (Sec. 4): when w(λ) is monotone (non-increasing in λ, i.e. non-decreasing in t), L_w is the ELBO of
the data augmented with Gaussian noise, up to a constant. Table 1 of the paper writes the usual losses as weightings:
ε-MSE with the cosine schedule has w = p_cos(λ) (not monotone), v-MSE with the cosine schedule w = e^{−λ/2}/(2a)
(monotone), EDM w = p_EDM(λ) (e^{−λ} + σ_d²)/σ_d² (not monotone), and their proposal w = sigmoid(b − λ).

lit_gen convention: the per-sample loss is ``factor(λ) · mean_dims (ε̂ − ε)²`` with ``factor = w(λ)/p(λ)`` — the
equation above without the ½ and averaged (not summed) over dimensions, so that EDM's Table 1 loss and the VP
losses of ``lit_gen.diffusion.vp`` come out unchanged: (``edm`` weighting, ``edm`` schedule) is ``EDM.loss``,
(``eps``/``v``/``snr_trunc``, ``cosine``) is ``VP.loss`` with that ``loss_weighting`` (tests/test_weighting.py).
With ``elbo`` weighting the loss is 2/D times the diffusion term of the negative ELBO
(``lit_gen.diffusion.likelihood``).

In VE coordinates (what ``denoise`` takes) a state at λ is x = y + σ_ve ε with σ_ve = e^{−λ/2}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_gen.diffusion.broadcast import append_dims, coef_like, compute_dtype
from lit_gen.diffusion.edm import EDM, Net
from lit_gen.diffusion.vp import VP, alpha_sigma, logsnr_cosine, v_from_x_eps
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable, describe

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------- noise distributions
class NoiseSchedule(Configurable):
    """A distribution p(λ) over log-SNR: ``sample`` draws λ, ``log_prob`` is log p(λ) (Kingma & Gao 2023, Sec. 3)."""

    name = "?"

    def sample(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        raise NotImplementedError

    def log_prob(self, lam: Tensor) -> Tensor:
        raise NotImplementedError


class LogNormalSigma(NoiseSchedule):
    """EDM's noise distribution ln σ ~ N(P_mean, P_std²) (EDM Table 1) written in λ = −2 ln σ:
    λ ~ N(−2 P_mean, (2 P_std)²) (Kingma & Gao 2023, Table 1, "EDM").

    Args:
        p_mean: mean of ln σ.
        p_std: standard deviation of ln σ.
    """

    name = "edm"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if not p_std > 0:
            raise LitGenError(f"the log-normal noise schedule needs p_std > 0, got {p_std}")
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def sample(self, n, *, device=None, generator=None, dtype=torch.float32) -> Tensor:  # noqa: ANN001
        # The draw of EDM.sample_sigma (one standard normal per sample), mapped to λ.
        normal = torch.randn(n, device=device, generator=generator, dtype=dtype)
        return -2.0 * (normal * self.p_std + self.p_mean)

    def log_prob(self, lam: Tensor) -> Tensor:
        mean, std = -2.0 * self.p_mean, 2.0 * self.p_std
        return -0.5 * ((lam - mean) / std) ** 2 - math.log(std) - 0.5 * LOG_2PI


class CosineT(NoiseSchedule):
    """t ~ U(0, 1), λ = −2 ln tan(a t + b) (the VP cosine schedule of ``vp.logsnr_cosine``), whose density is
    p(λ) = −dt/dλ = sech(λ/2) / (4a) on [λ_min, λ_max] (Kingma & Gao 2023, Table 1; a = π/2 for the
    untruncated cosine schedule gives their sech(λ/2)/(2π)).

    Args:
        logsnr_min: λ at t = 1.
        logsnr_max: λ at t = 0.
    """

    name = "cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> None:
        if not logsnr_min < logsnr_max:
            raise LitGenError(
                f"the cosine noise schedule needs logsnr_min < logsnr_max, got {logsnr_min} >= {logsnr_max}"
            )
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        self._a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b

    def sample(self, n, *, device=None, generator=None, dtype=torch.float32) -> Tensor:  # noqa: ANN001
        # The draw of VP.loss (one uniform t per sample).
        t = torch.rand(n, device=device, generator=generator, dtype=dtype)
        return logsnr_cosine(t, self.logsnr_min, self.logsnr_max)

    def log_prob(self, lam: Tensor) -> Tensor:
        # log sech(λ/2) = −|λ|/2 − log((1 + e^{−|λ|})/2), stable for large |λ|.
        half = lam.abs() / 2
        log_sech = -half - torch.log1p(torch.exp(-2 * half)) + math.log(2.0)
        inside = (lam >= self.logsnr_min - 1e-6) & (lam <= self.logsnr_max + 1e-6)
        return torch.where(inside, log_sech - math.log(4 * self._a), torch.full_like(lam, -math.inf))


class UniformLogSNR(NoiseSchedule):
    """λ ~ U(λ_min, λ_max) (Kingma & Gao 2023, Sec. 5 use it as the non-adaptive baseline)."""

    name = "uniform"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> None:
        if not logsnr_min < logsnr_max:
            raise LitGenError(
                f"the uniform noise schedule needs logsnr_min < logsnr_max, got {logsnr_min} >= {logsnr_max}"
            )
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)

    def sample(self, n, *, device=None, generator=None, dtype=torch.float32) -> Tensor:  # noqa: ANN001
        u = torch.rand(n, device=device, generator=generator, dtype=dtype)
        return self.logsnr_min + (self.logsnr_max - self.logsnr_min) * u

    def log_prob(self, lam: Tensor) -> Tensor:
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        value = -math.log(self.logsnr_max - self.logsnr_min)
        return torch.where(inside, torch.full_like(lam, value), torch.full_like(lam, -math.inf))


class AdaptiveLogSNR(nn.Module, NoiseSchedule):
    """Adaptive noise distribution (Kingma & Gao 2023, Sec. 5.2 "adaptive noise schedule"; its appendix): p(λ) is a
    piecewise-constant density over ``bins`` equal λ bins, proportional to an exponential moving average of the
    loss integrand w(λ)·‖ε − ε̂‖² measured in each bin — the importance distribution that minimises the variance of
    the loss estimate — mixed with ``uniform`` of the uniform density so that every λ keeps being sampled.

    Its state (``ema``, ``seen``) is in module buffers, saved with the checkpoint: a resumed run draws the same λ.
    Bin statistics are summed over ranks (``torch.distributed``) before the update, so every rank keeps one p(λ).

    Args:
        logsnr_min: lower end of the λ range.
        logsnr_max: upper end of the λ range.
        bins: number of equal-width λ bins.
        momentum: EMA momentum of the per-bin statistic (per update).
        uniform: weight of the uniform density in the mixture, in (0, 1].
    """

    name = "adaptive"

    def __init__(
        self,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
        bins: int = 32,
        momentum: float = 0.99,
        uniform: float = 0.1,
    ) -> None:
        super().__init__()
        if not logsnr_min < logsnr_max:
            raise LitGenError(
                f"the adaptive noise schedule needs logsnr_min < logsnr_max, got {logsnr_min} >= {logsnr_max}"
            )
        if bins < 1:
            raise LitGenError(f"the adaptive noise schedule needs at least 1 bin, got {bins}")
        if not 0.0 <= momentum < 1.0:
            raise LitGenError(f"adaptive momentum must be in [0, 1), got {momentum}")
        if not 0.0 < uniform <= 1.0:
            raise LitGenError(f"adaptive uniform share must be in (0, 1], got {uniform}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.bins = int(bins)
        self.momentum = float(momentum)
        self.uniform = float(uniform)
        self.register_buffer("ema", torch.ones(self.bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(self.bins, dtype=torch.bool))

    @property
    def width(self) -> float:
        return (self.logsnr_max - self.logsnr_min) / self.bins

    def probs(self) -> Tensor:
        """Probability of each bin (float64, sums to 1)."""
        ema = torch.where(self.seen, self.ema, self.ema[self.seen].mean() if self.seen.any() else self.ema)
        ema = ema.clamp_min(0)
        total = ema.sum()
        shaped = ema / total if total > 0 else torch.full_like(ema, 1.0 / self.bins)
        return (1 - self.uniform) * shaped + self.uniform / self.bins

    def bin_of(self, lam: Tensor) -> Tensor:
        idx = torch.floor((lam.double() - self.logsnr_min) / self.width).long()
        return idx.clamp(0, self.bins - 1)

    def sample(self, n, *, device=None, generator=None, dtype=torch.float32) -> Tensor:  # noqa: ANN001
        probs = self.probs().to(device=device if device is not None else self.ema.device)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        u = torch.rand(n, device=probs.device, generator=generator, dtype=torch.float64)
        return (self.logsnr_min + (idx.double() + u) * self.width).to(dtype)

    def log_prob(self, lam: Tensor) -> Tensor:
        probs = self.probs().to(lam.device)
        inside = (lam >= self.logsnr_min) & (lam <= self.logsnr_max)
        value = torch.log(probs[self.bin_of(lam)] / self.width).to(lam.dtype)
        return torch.where(inside, value, torch.full_like(lam, -math.inf))

    @torch.no_grad()
    def update(self, lam: Tensor, integrand: Tensor) -> None:
        """Fold the batch's per-sample integrand w(λ)·‖ε − ε̂‖² (= loss · p(λ)) into the per-bin EMA."""
        idx = self.bin_of(lam.detach()).to(self.ema.device)
        values = integrand.detach().double().to(self.ema.device)
        sums = torch.zeros(self.bins, dtype=torch.float64, device=self.ema.device).index_add_(0, idx, values)
        counts = torch.zeros(self.bins, dtype=torch.float64, device=self.ema.device).index_add_(
            0, idx, torch.ones_like(values)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        hit = counts > 0
        mean = sums[hit] / counts[hit]
        old = self.ema[hit]
        self.ema[hit] = torch.where(self.seen[hit], self.momentum * old + (1 - self.momentum) * mean, mean)
        self.seen |= hit


# ------------------------------------------------------------------------------------------------------- weightings
@dataclass(frozen=True)
class WeightingSpec:
    """One row of the weighting table.

    Args:
        description: w(λ) and where it comes from.
        monotone: w is non-increasing in λ, so the loss is an ELBO of noise-augmented data (Kingma & Gao 2023,
            Sec. 4). Checked numerically by tests/test_weighting.py.
        native: the noise schedule under which the weighting is the classic unweighted-looking loss (its w/p has a
            closed form), or None.
    """

    description: str
    monotone: bool
    native: str | None


WEIGHTINGS: dict[str, WeightingSpec] = {
    "elbo": WeightingSpec(
        "w(λ) = 1: the VLB of VDM (Kingma et al. 2021, eq. 17; Kingma & Gao 2023, Sec. 3)", True, None
    ),
    "eps": WeightingSpec(
        "w(λ) = p_cos(λ) = sech(λ/2)/(4a): ε-MSE ‖ε̂ − ε‖² under the cosine schedule (DDPM's L_simple, Ho et al. 2020 "
        "eq. 14; Kingma & Gao 2023 Table 1)",
        False,
        "cosine",
    ),
    "v": WeightingSpec(
        "w(λ) = p_cos(λ)(1 + e^{−λ}) = e^{−λ/2}/(2a): v-MSE under the cosine schedule (Salimans & Ho 2022; Kingma & "
        "Gao 2023 Table 1)",
        True,
        "cosine",
    ),
    "snr_trunc": WeightingSpec(
        "w(λ) = p_cos(λ) max(1, e^{−λ}): truncated-SNR x-MSE max(SNR, 1)‖x̂ − x‖² under the cosine schedule "
        "(Salimans & Ho 2022, Sec. 4)",
        True,
        "cosine",
    ),
    "edm": WeightingSpec(
        "w(λ) = N(λ; −2 P_mean, (2 P_std)²)(e^{−λ} + σ_d²)/σ_d²: EDM's loss (Karras et al. 2022 Table 1) written in λ "
        "(Kingma & Gao 2023 Table 1)",
        False,
        "edm",
    ),
    "sigmoid": WeightingSpec(
        "w(λ) = sigmoid(b − λ), b = weighting_bias (Kingma & Gao 2023, Sec. 5; the issue's example uses b = −2)",
        True,
        None,
    ),
}


class Weighting(Configurable):
    """A named weighting w(λ) of ``WEIGHTINGS`` with the constants it needs.

    Args:
        name: a ``WEIGHTINGS`` key.
        bias: b of the ``sigmoid`` weighting.
        sigma_data: σ_d of the ``edm`` weighting.
        p_mean: P_mean of the ``edm`` weighting's Gaussian factor.
        p_std: P_std of the ``edm`` weighting's Gaussian factor.
        logsnr_min: λ range of the cosine density in ``eps`` / ``v`` / ``snr_trunc``.
        logsnr_max: see ``logsnr_min``.
    """

    def __init__(
        self,
        name: str = "elbo",
        bias: float = 0.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        logsnr_min: float = -20.0,
        logsnr_max: float = 20.0,
    ) -> None:
        if name not in WEIGHTINGS:
            raise LitGenError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not sigma_data > 0:
            raise LitGenError(f"weighting sigma_data must be positive, got {sigma_data}")
        self.name = name
        self.bias = float(bias)
        self.sigma_data = float(sigma_data)
        self.native_schedule: NoiseSchedule | None = None
        if WEIGHTINGS[name].native == "edm":
            self.native_schedule = LogNormalSigma(p_mean, p_std)
        elif WEIGHTINGS[name].native == "cosine":
            self.native_schedule = CosineT(logsnr_min, logsnr_max)

    @property
    def monotone(self) -> bool:
        """True when w is non-increasing in λ: the loss is then an ELBO (Kingma & Gao 2023, Sec. 4)."""
        return WEIGHTINGS[self.name].monotone

    def mse_factor(self, lam: Tensor) -> Tensor:
        """w(λ)/p_native(λ) in closed form for the weightings with a native schedule (the classic losses)."""
        if self.name == "eps":
            return torch.ones_like(lam)
        if self.name == "v":
            return 1 + torch.exp(-lam)  # ‖v̂ − v‖² = (1 + e^{−λ})‖ε̂ − ε‖²
        if self.name == "snr_trunc":
            return torch.clamp(torch.exp(-lam), min=1.0)  # max(SNR, 1)‖x̂ − x‖² = max(1, 1/SNR)‖ε̂ − ε‖²
        if self.name == "edm":
            sd2 = self.sigma_data**2
            return (torch.exp(-lam) + sd2) / sd2  # λ_EDM(σ)‖D − y‖² with ‖D − y‖² = σ²‖ε̂ − ε‖²
        raise ValueError(f"the {self.name} weighting has no native schedule")

    def log_w(self, lam: Tensor) -> Tensor:
        """log w(λ) (Kingma & Gao 2023, Table 1 and Sec. 5)."""
        if self.name == "elbo":
            return torch.zeros_like(lam)
        if self.name == "sigmoid":
            return torch.nn.functional.logsigmoid(self.bias - lam)
        assert self.native_schedule is not None
        return self.native_schedule.log_prob(lam) + torch.log(self.mse_factor(lam))

    def factor(self, lam: Tensor, schedule: NoiseSchedule) -> Tensor:
        """w(λ)/p(λ), the multiplier of mean(ε̂ − ε)² for λ drawn from ``schedule`` (closed form when native)."""
        native = self.native_schedule
        if native is not None and type(schedule) is type(native) and describe(schedule) == describe(native):
            return self.mse_factor(lam)
        return torch.exp(self.log_w(lam) - schedule.log_prob(lam))


# -------------------------------------------------------------------------------------------- the weighted loss
def logsnr_range(param: EDM | VP) -> tuple[float, float]:
    """The λ range a parameterisation trains on: VP's [logsnr_min, logsnr_max]; EDM's [−2 ln σ_max, −2 ln σ_min]."""
    if isinstance(param, VP):
        return param.logsnr_min, param.logsnr_max
    return -2.0 * math.log(param.sigma_max), -2.0 * math.log(param.sigma_min)


NOISE_SCHEDULES: dict[str, str] = {
    "edm": "ln σ ~ N(P_mean, P_std²) (EDM Table 1; the EDM parameterisation's P_mean/P_std, else EDM's -1.2/1.2)",
    "cosine": "t ~ U(0, 1), λ = −2 ln tan(a t + b) (VP cosine schedule; over the parameterisation's λ range)",
    "uniform": "λ ~ U(λ_min, λ_max) over the parameterisation's λ range",
    "adaptive": "piecewise-constant p(λ) ∝ EMA of the loss integrand per λ bin (Kingma & Gao 2023, Sec. 5.2)",
}


def build_schedule(name: str, param: EDM | VP, bins: int = 32, momentum: float = 0.99) -> NoiseSchedule:
    """The ``NOISE_SCHEDULES`` entry ``name`` with the constants of ``param``."""
    lo, hi = logsnr_range(param)
    if name == "edm":
        return LogNormalSigma(param.p_mean, param.p_std) if isinstance(param, EDM) else LogNormalSigma()
    if name == "cosine":
        return CosineT(lo, hi)
    if name == "uniform":
        return UniformLogSNR(lo, hi)
    if name == "adaptive":
        return AdaptiveLogSNR(lo, hi, bins=bins, momentum=momentum)
    raise LitGenError(f"unknown noise_schedule {name!r}; choose one of {', '.join(NOISE_SCHEDULES)}")


def build_weighting(name: str, param: EDM | VP, bias: float = 0.0) -> Weighting:
    """The ``WEIGHTINGS`` entry ``name`` with the constants of ``param``."""
    lo, hi = logsnr_range(param)
    edm = param if isinstance(param, EDM) else EDM(sigma_data=param.sigma_data)
    return Weighting(name, bias, param.sigma_data, edm.p_mean, edm.p_std, lo, hi)


def native_objective(param: EDM | VP) -> tuple[str, str]:
    """(weighting, noise_schedule) names under which ``weighted_loss`` equals ``param.loss`` (today's losses)."""
    if isinstance(param, VP):
        return param.loss_weighting, "cosine"
    return "edm", "edm"


def eps_mse(param: EDM | VP, net: Net, y: Tensor, lam: Tensor, noise: Tensor, label: Tensor | None) -> Tensor:
    """Per-sample mean over dims of (ε̂ − ε)² at log-SNR ``lam`` ([B]) with noise ``noise``, computed in the
    network's own output space (VP: ε, x or v prediction; EDM: the denoiser D, ‖ε̂ − ε‖² = ‖D − y‖²/σ²)."""
    if isinstance(param, VP):
        alpha, sigma = alpha_sigma(lam)
        z = coef_like(alpha, y) * y + coef_like(sigma, y) * noise
        x_hat, eps_hat, v_hat = param.predict(net, z, lam, label)
        if param.prediction == "eps":
            err = (eps_hat - noise) ** 2
        elif param.prediction == "x":
            err = append_dims(torch.exp(lam), y.ndim) * (x_hat - y) ** 2
        else:
            err = append_dims(alpha**2, y.ndim) * (v_hat - v_from_x_eps(y, noise, alpha, sigma)) ** 2
    else:
        sigma = torch.exp(-0.5 * lam)
        x = y + append_dims(sigma, y.ndim) * noise
        d = param.denoise(net, x, sigma, label)
        err = (d - y) ** 2 / append_dims(sigma, y.ndim) ** 2
    return err.reshape(y.shape[0], -1).mean(dim=1)


def weighted_loss(
    param: EDM | VP,
    net: Net,
    y: Tensor,
    label: Tensor | None,
    weighting: Weighting,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample w(λ)/p(λ) · mean(ε̂ − ε)² with λ ~ ``schedule`` (Kingma & Gao 2023, the weighted loss in λ; see the
    module docstring for the ½ and the mean over dims). λ is drawn first, then ε, both with ``generator`` when given
    — the order of ``EDM.loss`` and ``VP.loss``.

    Returns:
        ``(loss [B], lam [B], integrand [B])`` with integrand = w(λ)·mean(ε̂ − ε)² (what ``AdaptiveLogSNR`` tracks).
    """
    dtype = compute_dtype(y)
    y = y.to(dtype)
    lam = schedule.sample(y.shape[0], device=y.device, generator=generator, dtype=dtype)
    noise = torch.randn(y.shape, device=y.device, generator=generator, dtype=dtype)
    mse = eps_mse(param, net, y, lam, noise, label)
    loss = weighting.factor(lam, schedule).to(dtype) * mse
    integrand = torch.exp(weighting.log_w(lam).double()).to(dtype) * mse.detach()
    return loss, lam, integrand


def describe_objective(weighting: Weighting, schedule: NoiseSchedule) -> dict[str, Any]:
    """The objective as plain data, for a checkpoint's description."""
    return {"weighting": describe(weighting), "noise_schedule": describe(schedule), "elbo": weighting.monotone}
