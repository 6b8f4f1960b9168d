"""Discrete-time variance-preserving parameterisation: a teacher trained on its own table of T noise levels.

DDPM (Ho et al. 2020, eq. 4) noises z_i = √ᾱ_i y + √(1 − ᾱ_i) ε at integer timesteps i = 0..T−1 with
ᾱ_i = ∏_{j≤i} (1 − β_j), and the network sees (z_i, i). In lit_gen's VE coordinates x = z/√ᾱ that state is
x = y + σ_i ε with σ_i = √((1 − ᾱ_i)/ᾱ_i) (Karras et al. 2022, "Elucidating the Design Space", Table 1, VP column,
written for a discrete table; Song et al. 2021, "Denoising Diffusion Implicit Models", Sec. 4.3). A continuous σ
between two table entries maps to a fractional timestep by interpolating t linearly in ln σ between its neighbours,
so every lit_gen sampler and distillation method (which ask for arbitrary σ) runs on such a teacher.

The β tables are diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` ones ("linear", "scaled_linear",
"squaredcos_cap_v2", computed in float32 as diffusers does), and the prediction types its ``prediction_type``:
"epsilon" (ε, Ho et al. 2020), "v_prediction" (v = √ᾱ ε − √(1−ᾱ) y, Salimans & Ho 2022, Sec. 4) and "sample" (y).
``sigmas_uniform_t`` is the DDIM grid on the model's own timesteps (``timestep_spacing`` "leading" or "trailing"),
so ``--sampler ddim`` reproduces ``DDIMScheduler`` (η = 0, ``set_alpha_to_one``, no clipping) step for step: a VP
DDIM step is the Euler step in VE coordinates (``samplers.sample_ddim``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, coef_like, compute_dtype, expand_sigma
from lit_gen.diffusion.edm import Net
from lit_gen.diffusion.vp import _predictions
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

BETA_SCHEDULES: dict[str, str] = {
    "linear": "β_i linear from beta_start to beta_end (Ho et al. 2020, Sec. 4)",
    "scaled_linear": "√β_i linear from √beta_start to √beta_end (latent diffusion / Stable Diffusion)",
    "squaredcos_cap_v2": "ᾱ(t) = cos²((t + 0.008)/1.008 · π/2), β capped at 0.999 (Nichol & Dhariwal 2021, eq. 17)",
}
PREDICTION_TYPES: dict[str, str] = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
TIMESTEP_SPACINGS = ("leading", "trailing")
SNAP = 1e-3  # a timestep this close to an integer is that integer: float32 round-off of σ(i), not a new level


def betas_table(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """β_0..β_{T−1} exactly as diffusers' schedulers build them (float32). Shape [T]."""
    t = num_train_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, t, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)]
        return torch.tensor(betas, dtype=torch.float32)
    raise LitGenError(f"unknown beta_schedule {schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


class DiscreteVP(Configurable):
    """A DDPM-style teacher's own noise table as a lit_gen parameterisation (VE interface like ``EDM``/``VP``).

    ``denoise(net, x, σ)``: z = x/√(1 + σ²) (= √ᾱ x), t = the teacher timestep of σ (``c_noise``), then the
    network output of ``prediction_type`` turned into x̂ (``vp._predictions``). The network receives
    (z, t, label): ``c_noise`` *is* the timestep, EDM Table 1's c_noise = (M − 1) t for its VP column.

    Args:
        num_train_timesteps: T, the number of training timesteps.
        beta_schedule: "linear", "scaled_linear" or "squaredcos_cap_v2" (diffusers' names).
        beta_start: β_0 of the linear schedules.
        beta_end: β_{T−1} of the linear schedules.
        prediction_type: "epsilon", "v_prediction" or "sample" (diffusers' names).
        timestep_spacing: DDIM timesteps for K steps: "leading" (i·⌊T/K⌋ + offset, DDIM's) or "trailing".
        steps_offset: added to the "leading" timesteps (Stable Diffusion uses 1).
        sigma_data: standard deviation of the data (0.5 for pixels in [-1, 1]); read by methods that need it.
    """

    kind = "vp"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        sigma_data: float = 0.5,
    ) -> None:
        if num_train_timesteps < 2:
            raise LitGenError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        if prediction_type not in PREDICTION_TYPES:
            raise LitGenError(
                f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise LitGenError(
                f"timestep_spacing {timestep_spacing!r} is not supported; choose one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        betas = betas_table(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise LitGenError(
                f"the {beta_schedule} betas must lie in (0, 1); got beta_start={beta_start}, end={beta_end}"
            )
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.prediction = PREDICTION_TYPES[prediction_type]
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.sigma_data = float(sigma_data)
        # ᾱ in float32 as diffusers computes it (torch.cumprod of 1 − β), then σ_i = √((1 − ᾱ_i)/ᾱ_i) in float64.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ab = self.alphas_cumprod.double()
        self.sigmas = torch.sqrt((1 - ab) / ab)
        self.log_sigmas = torch.log(self.sigmas)
        if not bool((self.log_sigmas[1:] > self.log_sigmas[:-1]).all()):
            raise LitGenError("the noise table must increase with the timestep (ᾱ_i decreasing)")
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    # --- σ ↔ timestep ---
    def sigma_at(self, t: Tensor) -> Tensor:
        """σ(t) for fractional timesteps t ∈ [0, T−1]: ln σ linear between the table entries."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        log_s = self.log_sigmas.to(t.device)
        return torch.exp(log_s[lo] * (1 - w) + log_s[lo + 1] * w)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The teacher timestep of σ (inverse of ``sigma_at``), clamped to [0, T−1], snapped to an integer within
        ``SNAP`` (σ_i rounded to float32 must still mean timestep i). Same shape and dtype as ``sigma``."""
        log_s = self.log_sigmas.to(sigma.device)
        q = torch.log(sigma.to(torch.float64)).clamp(log_s[0], log_s[-1])
        hi = torch.searchsorted(log_s, q).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        t = lo + (q - log_s[lo]) / (log_s[hi] - log_s[lo])
        rounded = t.round()
        t = torch.where((t - rounded).abs() < SNAP, rounded, t)
        return t.to(sigma.dtype)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """The network's noise input: the teacher's own timestep t(σ) (EDM Table 1, VP column)."""
        return self.timestep(sigma)

    # --- denoiser ---
    def denoise(self, net: Net, x: Tensor, sigma: Tensor | float, label: Tensor | None = None) -> Tensor:
        """x̂ from the VE state x = y + σ n: z = √ᾱ x with √ᾱ = 1/√(1 + σ²), t = t(σ), then the prediction → x̂
        (ε: x̂ = x − σ ε̂; v: x̂ = √ᾱ z − √(1−ᾱ) v̂; sample: x̂ = the output). ``sigma``: [B] (or a scalar)."""
        s = expand_sigma(sigma, x)
        x = x.to(s.dtype)
        alpha = torch.rsqrt(1 + s**2)
        z = append_dims(alpha, x.ndim) * x
        out = net(z, self.c_noise(s), label).to(s.dtype)
        return _predictions(out, z, alpha, s * alpha, self.prediction)[0]

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Weight of ‖x̂ − y‖² equal to the teacher's own loss: ε-MSE = SNR·x-MSE, v-MSE = (1 + SNR)·x-MSE,
        sample-MSE = x-MSE (SNR = 1/σ², Salimans & Ho 2022, Sec. 4)."""
        snr = sigma.pow(-2)
        if self.prediction == "eps":
            return snr
        if self.prediction == "v":
            return 1 + snr
        return torch.ones_like(sigma)

    def sample_sigma(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels: a continuous timestep t ~ U[0, T−1], σ = σ(t). Shape [n]."""
        t = torch.rand(n, device=device, generator=generator, dtype=torch.float64) * (self.num_train_timesteps - 1)
        return self.sigma_at(t).to(dtype)

    def loss(
        self, net: Net, y: Tensor, label: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample DDPM loss in the teacher's own prediction space (ε-, v- or sample-MSE; Ho et al. 2020 eq. 14,
        Salimans & Ho 2022 Sec. 4), written as ``loss_weight(σ)·‖x̂ − y‖²``. σ first, then the noise. Shape [B]."""
        dtype = compute_dtype(y)
        y = y.to(dtype)
        sigma = self.sample_sigma(y.shape[0], device=y.device, generator=generator, dtype=dtype)
        noise = torch.randn(y.shape, device=y.device, generator=generator, dtype=dtype)
        x_hat = self.denoise(net, y + append_dims(sigma, y.ndim) * noise, sigma, label)
        per_elem = coef_like(self.loss_weight(sigma), y) * (x_hat - y) ** 2
        return per_elem.reshape(y.shape[0], -1).mean(dim=1)

    # --- the teacher's own DDIM grid ---
    def ddim_timesteps(self, n: int) -> list[int]:
        """DDIMScheduler.set_timesteps(n) for this spacing, in sampling order (descending)."""
        if not 1 <= n <= self.num_train_timesteps:
            raise LitGenError(f"the number of DDIM steps must be in 1..{self.num_train_timesteps}, got {n}")
        ratio = self.num_train_timesteps // n
        if self.timestep_spacing == "leading":
            steps = [i * ratio + self.steps_offset for i in range(n)][::-1]
        else:
            if self.num_train_timesteps % n:
                raise LitGenError(
                    f"'trailing' DDIM steps must divide T = {self.num_train_timesteps} (DDIMScheduler steps by ⌊T/n⌋)"
                )
            steps = [round(self.num_train_timesteps - i * self.num_train_timesteps / n) - 1 for i in range(n)]
        if any(not 0 <= s < self.num_train_timesteps for s in steps):
            raise LitGenError(f"steps_offset={self.steps_offset} puts a DDIM timestep outside 0..T−1 for {n} steps")
        return steps

    def sigmas_uniform_t(
        self, n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """The DDIM grid on the teacher's own timesteps: σ(t_k) for ``ddim_timesteps(n)``, then 0 (DDIMScheduler's
        last step goes to ᾱ = 1, ``set_alpha_to_one``). Each step of DDIMScheduler goes from t to t − ⌊T/n⌋; with
        "leading" or "trailing" spacing that is the next timestep, so the grid is one chain. Shape [n + 1]."""
        steps = self.ddim_timesteps(n)
        sigmas = torch.cat([self.sigmas[steps], torch.zeros(1, dtype=torch.float64)])
        return sigmas.to(device=device, dtype=dtype)
