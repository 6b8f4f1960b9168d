"""TrigFlow and continuous-time consistency models (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sCM; arXiv 2410.11081). ALGORITHMS.md §10.

TrigFlow (sCM Sec. 2.2 / 3): x_t = cos t · x₀ + sin t · z with z ~ N(0, σ_d² I), t ∈ [0, π/2]; the network F_θ
predicts the velocity, dx_t/dt = σ_d F_θ(x_t/σ_d, c_noise(t)) on the probability-flow ODE, and the denoiser is
x̂ = cos t · x_t − sin t · σ_d F_θ. The consistency model *is* that denoiser (sCM eq. 9):

    f_θ(x_t, t) = cos t · x_t − sin t · σ_d F_θ(x_t/σ_d, c_noise(t)),     f_θ(x, 0) = x exactly.

EDM in TrigFlow coordinates (sCM Sec. 3, Appendix): σ = σ_d tan t, x_EDM = x_t / cos t. With EDM's Table 1
c_skip = cos² t, c_out = σ_d sin t, c_in · x_EDM = x_t/σ_d, so
D_EDM(x_EDM; σ) = cos t · x_t + σ_d sin t · F_EDM(x_t/σ_d, ln(σ)/4): an EDM network *is* a TrigFlow network
with F = −F_EDM and c_noise(t) = ln(σ_d tan t)/4 (``time_conditioning="edm"``), exactly —
which is how an EDM teacher is converted and a student started from it.
``time_conditioning="trigflow"`` feeds c_noise(t) = time_scale · t (the paper's own networks, sCT from scratch).

The sCM training signal (sCM Alg. 1, eq. 8 and Sec. 4.2):

    g = −cos² t (σ_d F_θ⁻ − dx_t/dt) − r · cos t sin t (x_t + σ_d dF_θ⁻/dt)        (= cos t · df_θ⁻/dt at r = 1)
    g ← g / (‖g‖ + c)                                    (tangent normalisation, c = 0.1)
    L = e^{−w_φ(t)}/D · ‖F_θ − F_θ⁻ − g‖² + w_φ(t)       (adaptive weighting; D = data dimension)

with r warmed up linearly from 0 to 1, dF_θ⁻/dt the derivative of F_θ⁻(x_t/σ_d, t) along (dx_t/dt, 1) — a
Jacobian-vector product (``torch.func.jvp``) or a central finite difference (FastGen's workaround where forward-mode AD
is unavailable: fused attention, sharded parameters) — and dx_t/dt = σ_d F_teacher (sCD) or cos t · z − sin t · x₀
(sCT). The paper writes the weight as e^{w_φ}/D · ‖·‖² − w_φ; here w_φ is the log-variance (the sign flipped), as
NVlabs/FastGen does — the same objective. t is proposed as tan t = e^τ/σ_d, τ ~ N(P_mean, P_std²) (sCM Sec. 4.3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, compute_dtype, expand_sigma
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

TIME_CONDITIONINGS = ("edm", "trigflow")
JVP_MODES = ("autograd", "finite")
T_EPS = 1e-5  # the network's t stays in [T_EPS, π/2 − T_EPS]: ln(σ_d tan t) is finite there (f(x, 0) = x still holds)

TrigNet = Callable[[Tensor, Tensor], Tensor]
"""``F(x_in, t) -> F``: a TrigFlow network with its label bound (x_in = x_t/σ_d; t of shape [B])."""


def t_from_sigma(sigma: Tensor, sigma_data: float) -> Tensor:
    """t = arctan(σ/σ_d) (sCM Sec. 3: EDM's σ in TrigFlow time); σ = 0 → 0, σ = ∞ → π/2."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_data))


def sigma_from_t(t: Tensor, sigma_data: float) -> Tensor:
    """σ = σ_d tan t (the inverse of ``t_from_sigma``)."""
    return sigma_data * torch.tan(t)


def trigflow_noise(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = cos t · x₀ + sin t · z (sCM eq. 5; z already scaled by σ_d). ``t``: [B]."""
    tb = append_dims(t, x0.ndim)
    return torch.cos(tb) * x0 + torch.sin(tb) * z


class TrigFlow(Configurable):
    """TrigFlow parameterisation of a consistency model / denoiser (sCM Sec. 3, eq. 9).

    ``denoise(net, x, σ, label)`` takes EDM (VE) coordinates like every lit_gen parameterisation, so the lit_gen
    samplers (the consistency sampler, CM Alg. 1) and ``lit-gen sample`` use a TrigFlow model unchanged.

    Args:
        sigma_data: σ_d, the data standard deviation (0.5 for images in [-1, 1]).
        time_conditioning: "edm" (c_noise = ln(σ_d tan t)/4 and F = −net: an EDM network unchanged, exactly) or
            "trigflow" (c_noise = time_scale · t and F = net, the paper's parameterisation for new networks).
        time_scale: the factor of t in the "trigflow" time conditioning (sCM feeds t to Fourier features; positional
            embeddings of DDPM-style nets want ~1000 t).
        sigma_min: smallest EDM σ of a default Karras grid (only for samplers asked without a grid).
        sigma_max: EDM σ where sampling starts: t_max = arctan(σ_max/σ_d) (sCM: σ_max = 80 with σ_d = 0.5).
    """

    kind = "trigflow"

    def __init__(
        self,
        sigma_data: float = 0.5,
        time_conditioning: str = "edm",
        time_scale: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        if not sigma_data > 0:
            raise LitGenError(f"TrigFlow sigma_data must be positive, got {sigma_data}")
        if time_conditioning not in TIME_CONDITIONINGS:
            raise LitGenError(
                f"unknown time_conditioning {time_conditioning!r}; choose one of: {', '.join(TIME_CONDITIONINGS)}"
            )
        if not 0 < sigma_min < sigma_max:
            raise LitGenError(f"TrigFlow needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_data = float(sigma_data)
        self.time_conditioning = time_conditioning
        self.time_scale = float(time_scale)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @classmethod
    def from_teacher(cls, param: object, time_conditioning: str = "edm", time_scale: float = 1.0) -> TrigFlow:
        """The TrigFlow parameterisation matching an EDM teacher (σ_d, σ_min, σ_max); ``time_conditioning`` "edm"
        makes the teacher's network the exact TrigFlow network (F = −F_EDM)."""
        if getattr(param, "kind", "") != "edm":
            raise LitGenError(f"the exact TrigFlow conversion needs an EDM teacher (sigma_data, VE σ); got {param!r}")
        return cls(
            sigma_data=param.sigma_data,  # type: ignore[attr-defined]
            time_conditioning=time_conditioning,
            time_scale=time_scale,
            sigma_min=param.sigma_min,  # type: ignore[attr-defined]
            sigma_max=param.sigma_max,  # type: ignore[attr-defined]
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    @property
    def t_max(self) -> float:
        """t where one-step sampling starts: arctan(σ_max/σ_d) (1.5645 for 80 / 0.5)."""
        return math.atan2(self.sigma_max, self.sigma_data)

    # --- the network in TrigFlow form (time embedding inputs in float32 at least: NVlabs/rcm #10) ---
    def c_noise(self, t: Tensor) -> Tensor:
        """The network's noise input: ln(σ_d tan t)/4 ("edm", EDM Table 1's c_noise at σ = σ_d tan t) or
        time_scale · t ("trigflow"). t is clamped to [T_EPS, π/2 − T_EPS] (finite at both ends)."""
        t = t.to(torch.promote_types(t.dtype, torch.float32)).clamp(T_EPS, math.pi / 2 - T_EPS)
        if self.time_conditioning == "edm":
            return torch.log(self.sigma_data * torch.tan(t)) / 4
        return self.time_scale * t

    def F(self, net: Callable[..., Tensor], x_in: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """F_θ(x_t/σ_d, t) (sCM eq. 9's network output; ``x_in`` = x_t/σ_d, ``t``: [B])."""
        out = net(x_in, self.c_noise(t), label)
        return -out if self.time_conditioning == "edm" else out

    def bind(self, net: Callable[..., Tensor], label: Tensor | None = None) -> TrigNet:
        """``F(x_in, t)`` with the label bound: the function the JVP differentiates."""
        return lambda x_in, t: self.F(net, x_in, t, label)

    def consistency(self, net: Callable[..., Tensor], x_t: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """f_θ(x_t, t) = cos t · x_t − sin t · σ_d F_θ(x_t/σ_d, t) (sCM eq. 9). ``t``: [B]; f(x, 0) = x exactly.

        cos t and sin t are computed in float64 and rounded once (near t = π/2, cos t has few significant bits)."""
        dtype = compute_dtype(x_t)
        x_t = x_t.to(dtype)
        t64 = append_dims(t.to(torch.float64), x_t.ndim)
        cos, sin = torch.cos(t64).to(dtype), torch.sin(t64).to(dtype)
        out = self.F(net, x_t / self.sigma_data, t, label).to(dtype)
        return cos * x_t - sin * self.sigma_data * out

    def denoise(
        self, net: Callable[..., Tensor], x: Tensor, sigma: Tensor | float, label: Tensor | None = None
    ) -> Tensor:
        """The same model in EDM coordinates: t = arctan(σ/σ_d), x_t = cos t · x (sCM Sec. 3), returns f(x_t, t).

        For an EDM network with ``time_conditioning="edm"`` this equals ``EDM.denoise`` at the same (x, σ) (t in
        float64: the conversion loses no precision at large σ)."""
        s = expand_sigma(sigma, x)
        t = t_from_sigma(s.to(torch.float64), self.sigma_data)
        x_t = (torch.cos(append_dims(t, x.ndim)) * x.to(torch.float64)).to(s.dtype)
        return self.consistency(net, x_t, t, label)

    # --- the probability-flow ODE in TrigFlow time ---
    def velocity_from_denoised(self, x_t: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
        """dx_t/dt = σ_d F = (cos t · x_t − x̂)/sin t: the PF-ODE velocity of any denoiser x̂ (inverts sCM eq. 9).
        ``t`` must be > 0 (training times are)."""
        tb = append_dims(t, x_t.ndim)
        return (torch.cos(tb) * x_t - x0_hat) / torch.sin(tb)

    def denoised_at(self, denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, label: Tensor | None) -> Tensor:
        """A VE-coordinate denoiser D(x, σ, label) (a lit_gen teacher) evaluated at TrigFlow (x_t, t)."""
        return denoiser(x_t / torch.cos(append_dims(t, x_t.ndim)), sigma_from_t(t, self.sigma_data), label)

    def sample_t(
        self,
        n: int,
        p_mean: float,
        p_std: float,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The proposal of sCM Sec. 4.3: τ ~ N(P_mean, P_std²), t = arctan(e^τ/σ_d) (EDM's log-normal σ = e^τ).
        Shape [n]."""
        tau = torch.randn(n, device=device, generator=generator, dtype=dtype) * p_std + p_mean
        return torch.atan(torch.exp(tau) / self.sigma_data)

    def sampling_grid(self, mid_t: float = 1.1) -> list[float]:
        """EDM σ points of 1- and 2-step sampling, [σ_max, σ_d tan(mid_t), 0] (sCM Sec. 5: t_mid = 1.1)."""
        if not 0 < mid_t < self.t_max:
            raise LitGenError(f"the intermediate sampling time must be in (0, {self.t_max:.4f}), got {mid_t}")
        return [self.sigma_max, self.sigma_data * math.tan(mid_t), 0.0]


# --------------------------------------------------------------------------------------------- the tangent
def math_attention() -> contextlib.AbstractContextManager[None]:
    """``scaled_dot_product_attention`` on its math backend: the fused CUDA kernels (flash, memory-efficient, cuDNN)
    have no forward-mode AD (flash-attention #1672, pytorch #165530), the math one does (FastGen does the same)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def jvp_time_derivative(
    fn: TrigNet,
    x_in: Tensor,
    t: Tensor,
    dx_in: Tensor,
    dt: Tensor,
    mode: str = "autograd",
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """(F(x_in, t), dF) with dF the directional derivative of F along (dx_in, dt) — sCM's dF_θ⁻/dt when
    (dx_in, dt) = (dx_t/dt / σ_d, 1), or cos t sin t times it for the paper's scaled tangent.

    "autograd": ``torch.func.jvp`` (forward-mode AD, exact). "finite": the central difference
    (F(x + εv, t + ε dt) − F(x − εv, t − ε dt)) / 2ε (FastGen's fallback where forward-mode AD is unavailable),
    the primal then is a third, plain evaluation. Run under ``torch.no_grad`` for a stop-gradient target.
    """
    if mode == "autograd":
        with math_attention():
            return torch.func.jvp(fn, (x_in, t), (dx_in, dt))
    if mode == "finite":
        tb = dt * eps
        xb = dx_in * eps
        plus, minus = fn(x_in + xb, t + tb), fn(x_in - xb, t - tb)
        return fn(x_in, t), (plus - minus) / (2 * eps)
    raise LitGenError(f"unknown jvp mode {mode!r}; choose one of: {', '.join(JVP_MODES)}")


def scm_tangent(
    F_minus: Tensor,
    dF_scaled: Tensor,
    x_t: Tensor,
    dxt_dt: Tensor,
    t: Tensor,
    sigma_data: float,
    warmup: float = 1.0,
    norm_const: float | None = 0.1,
) -> Tensor:
    """The sCM tangent g (sCM Alg. 1; ALGORITHMS.md §10), normalised to g/(‖g‖ + c) unless ``norm_const`` is None.

    g = −cos² t (σ_d F_θ⁻ − dx_t/dt) − r · (cos t sin t · x_t + σ_d · cos t sin t · dF_θ⁻/dt), where ``dF_scaled``
    is cos t sin t · dF_θ⁻/dt (the JVP with the paper's tangent (cos t sin t dx_t/dt / σ_d, cos t sin t)) and r the
    warm-up factor. At r = 1 and without normalisation g = cos t · df_θ⁻/dt.
    """
    tb = append_dims(t, x_t.ndim)
    cos, sin = torch.cos(tb), torch.sin(tb)
    g = -(cos**2) * (sigma_data * F_minus - dxt_dt) - warmup * (cos * sin * x_t + sigma_data * dF_scaled)
    if norm_const is None:
        return g
    norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
    return g / (append_dims(norm, g.ndim) + norm_const)


def scm_loss(F_online: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | None = None) -> Tensor:
    """Per-sample sCM loss (sCM eq. 8 with adaptive weighting, Sec. 4.2): e^{−w}/D · ‖F_θ − F_θ⁻ − g‖² + w with
    w = ``logvar`` (w_φ(t) of the paper with the sign flipped), or the plain mean squared error without it. [B]."""
    per = ((F_online - F_minus - g) ** 2).reshape(F_online.shape[0], -1).mean(dim=1)
    if logvar is None:
        return per
    logvar = logvar.reshape(-1).to(per.dtype)
    return torch.exp(-logvar) * per + logvar
