"""Likelihood of a diffusion model: the negative ELBO (VDM) and the exact NLL by the probability-flow ODE.

Both work on any denoiser ``D(x, sigma, label)`` in VE coordinates x_σ = y + σ ε (what ``EDM.denoise`` and
``VP.denoise`` are), in the model's own (training) space, and return nats per *sample* (summed over dimensions);
``lit_gen.eval.likelihood`` converts to nats/dim in data units or bits/dim.

Negative ELBO (Kingma et al. 2021, VDM, eqs. 11-17; DDPM's bound of Ho et al. 2020 eq. 5 in continuous time), for
the model that draws x_{σ_max} ~ N(0, σ_max² I) (lit_gen's sampler prior), runs the reverse diffusion down to σ_min
and decodes x ~ N(x_{σ_min}, σ_min² I):

    −log p(y) ≤ ‖y‖² / (2 σ_max²)                               prior: KL(N(y, σ_max²) ‖ N(0, σ_max²))
              + ½ ∫_{λ_min}^{λ_max} E_ε ‖ε − ε̂(y + e^{−λ/2} ε; λ)‖² dλ   diffusion (VDM eq. 17; Kingma & Gao eq. 8)
              + D/2 (log(2π σ_min²) + 1)                  reconstruction E_ε[−log N(y; y + σ_min ε, σ_min²)]

with λ = −2 ln σ, λ_min = −2 ln σ_max, λ_max = −2 ln σ_min. The λ integral is importance-sampled with the uniform
proposal q(λ) = 1/(λ_max − λ_min), stratified: ``n_lambda`` λ per sample, one in each of as many equal strata.

Exact NLL (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 13 and App. D.2; Chen et al. 2018
instantaneous change of variables): in s = ln σ the probability-flow ODE of EDM (Karras et al. 2022 eq. 4 with
σ(t) = t) is dx/ds = x − D(x; e^s), and

    log p_{σ_min}(x(s_min)) = log N(x(s_max); 0, σ_max² I) + ∫_{s_min}^{s_max} ∇·(x − D(x; e^s)) ds,

∇·(x − D) = D − tr(∂D/∂x) (the dimension D minus the trace). The trace is exact (one vector-Jacobian product per
dimension) or Hutchinson's estimate vᵀ(∂D/∂x)v with one Rademacher v per sample held fixed along the path
(Grathwohl et al. 2019, FFJORD). The solver is fixed-step on ``steps`` equal steps in ln σ: the classic 4th-order
Runge-Kutta method (4 NFE per step; default) or Heun's method (2 NFE per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims
from lit_gen.errors import LitGenError

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]
LOG_2PI = math.log(2.0 * math.pi)
TRACES = ("auto", "exact", "hutchinson")
SOLVERS = ("rk4", "heun")
EXACT_TRACE_MAX_DIM = 16
"""``trace="auto"`` computes the exact trace up to this many dimensions and Hutchinson's estimate above."""


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise LitGenError(f"likelihood needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


def negative_elbo_terms(
    denoiser: Denoiser,
    y: Tensor,
    label: Tensor | None = None,
    *,
    sigma_min: float,
    sigma_max: float,
    n_lambda: int = 32,
    control_variate: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The three terms of the negative ELBO (module docstring), each [B] in nats per sample (model space).

    Args:
        denoiser: ``D(x, sigma, label)`` in VE coordinates.
        y: data in the model's space, [B, ...].
        label: class labels [B] for a conditional model (the bound is then of log p(y | label)).
        sigma_min: σ at the data end (decoder width); λ_max = −2 ln σ_min.
        sigma_max: σ of the prior N(0, σ_max² I); λ_min = −2 ln σ_max.
        n_lambda: λ draws per sample (stratified uniform importance sampling).
        control_variate: subtract the cross-fitted control variate c(‖ε‖² − D) (unbiased; lower variance).
        generator: draws λ offsets and ε (reproducible).

    Returns:
        ``{"prior", "diffusion", "reconstruction"}``; their sum is the negative ELBO.
    """
    _check_range(sigma_min, sigma_max)
    if n_lambda < 1:
        raise LitGenError(f"the ELBO needs at least one λ per sample, got {n_lambda}")
    y = y.double() if y.dtype == torch.float64 else y.float()
    batch, dim = y.shape[0], y[0].numel()
    lam_min, lam_max = -2.0 * math.log(sigma_max), -2.0 * math.log(sigma_min)
    width = lam_max - lam_min
    prior = y.reshape(batch, -1).pow(2).sum(1) / (2 * sigma_max**2)
    reconstruction = torch.full((batch,), 0.5 * dim * (LOG_2PI + 2 * math.log(sigma_min) + 1), dtype=y.dtype)
    offsets = torch.rand(batch, n_lambda, generator=generator, dtype=torch.float64)
    strata = (torch.arange(n_lambda, dtype=torch.float64) + offsets) / n_lambda
    lam = (lam_min + width * strata).to(device=y.device, dtype=y.dtype)  # [B, K]
    diffusion = torch.zeros(batch, dtype=y.dtype, device=y.device)
    half = torch.arange(batch, device=y.device) % 2 == 0
    for k in range(n_lambda):
        sigma = torch.exp(-0.5 * lam[:, k])
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        x = y + append_dims(sigma, y.ndim) * eps
        d = denoiser(x, sigma, label).to(y.dtype)
        eps_hat = (x - d) / append_dims(sigma, y.ndim)
        err = (eps - eps_hat).reshape(batch, -1).pow(2).sum(1)
        # Control variate b = ‖ε‖² − D (mean exactly 0): err − c b has the same mean. c = Cov(err, b)/Var(b) is
        # fitted on the other half of the batch (cross-fitting), so it is independent of the samples it corrects
        # and the estimate stays unbiased; where ε̂ ≈ 0 (low noise) it removes the χ²_D noise of ‖ε‖².
        b = eps.reshape(batch, -1).pow(2).sum(1) - dim
        if control_variate and batch >= 8:
            c = torch.where(half, _cv_coefficient(err[~half], b[~half]), _cv_coefficient(err[half], b[half]))
            err = err - c * b
        # ½ ‖ε − ε̂‖² / q(λ) with q = 1/width, averaged over the K stratified draws.
        diffusion += 0.5 * width * err / n_lambda
    return {"prior": prior, "diffusion": diffusion, "reconstruction": reconstruction.to(y.device)}


def _cv_coefficient(a: Tensor, b: Tensor) -> Tensor:
    """Least-squares coefficient Cov(a, b) / Var(b) of a control variate b (0 when b does not vary)."""
    bc = b - b.mean()
    var = bc.pow(2).mean()
    return torch.where(var > 0, ((a - a.mean()) * bc).mean() / var.clamp_min(1e-30), torch.zeros_like(var))


def negative_elbo(denoiser: Denoiser, y: Tensor, label: Tensor | None = None, **kwargs: object) -> Tensor:
    """−ELBO ≥ −log p(y), in nats per sample (model space), [B]. Arguments as ``negative_elbo_terms``."""
    terms = negative_elbo_terms(denoiser, y, label, **kwargs)  # type: ignore[arg-type]
    return terms["prior"] + terms["diffusion"] + terms["reconstruction"]


def _divergence(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, label: Tensor | None, probe: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(dx/ds = x − D, ∇·(x − D)) at state x and noise level sigma ([B]); exact trace when ``probe`` is None."""
    batch, dim = x.shape[0], x[0].numel()
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        d = denoiser(xg, sigma, label).to(x.dtype)
        if probe is not None:
            (vjp,) = torch.autograd.grad(d, xg, grad_outputs=probe)
            trace = (vjp * probe).reshape(batch, -1).sum(1)
        else:
            flat = d.reshape(batch, -1)
            trace = torch.zeros(batch, dtype=x.dtype, device=x.device)
            for j in range(dim):
                (row,) = torch.autograd.grad(flat[:, j].sum(), xg, retain_graph=j < dim - 1)
                trace += row.reshape(batch, -1)[:, j]
    return (x - d).detach(), (dim - trace).detach()


def pf_ode_nll(
    denoiser: Denoiser,
    y: Tensor,
    label: Tensor | None = None,
    *,
    sigma_min: float,
    sigma_max: float,
    steps: int = 32,
    solver: str = "rk4",
    trace: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    """−log p(y) through the probability-flow ODE (module docstring), nats per sample (model space), [B].

    Args:
        denoiser: ``D(x, sigma, label)`` in VE coordinates.
        y: data in the model's space, [B, ...], taken as the ODE state at σ_min.
        label: class labels [B] for a conditional model (then −log p(y | label)).
        sigma_min: where the ODE starts (the data end).
        sigma_max: where it ends, under the prior N(0, σ_max² I).
        steps: solver steps, equal in ln σ.
        solver: "rk4" (classic Runge-Kutta, 4 NFE per step, error O(h⁴)) or "heun" (2 NFE per step, O(h²)).
        trace: "exact", "hutchinson" or "auto" (exact up to ``EXACT_TRACE_MAX_DIM`` dimensions).
        generator: draws Hutchinson's Rademacher probes (the NLL's own seed).
    """
    _check_range(sigma_min, sigma_max)
    if steps < 1:
        raise LitGenError(f"the probability-flow ODE needs at least 1 step, got {steps}")
    if solver not in SOLVERS:
        raise LitGenError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if trace not in TRACES:
        raise LitGenError(f"unknown trace {trace!r}; choose one of {', '.join(TRACES)}")
    x = y.double() if y.dtype == torch.float64 else y.float()
    batch, dim = x.shape[0], x[0].numel()
    exact = trace == "exact" or (trace == "auto" and dim <= EXACT_TRACE_MAX_DIM)
    probe = None
    if not exact:
        signs = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int64)
        probe = (2 * signs - 1).to(device=x.device, dtype=x.dtype)
    s = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1, dtype=torch.float64)
    logdet = torch.zeros(batch, dtype=x.dtype, device=x.device)

    def field(state: Tensor, s_value: float) -> tuple[Tensor, Tensor]:
        sigma = torch.full((batch,), math.exp(s_value), dtype=x.dtype, device=x.device)
        return _divergence(denoiser, state, sigma, label, probe)

    for i in range(steps):
        h, s0, s1 = float(s[i + 1] - s[i]), float(s[i]), float(s[i + 1])
        if solver == "heun":
            f0, div0 = field(x, s0)
            f1, div1 = field(x + h * f0, s1)
            x = x + 0.5 * h * (f0 + f1)
            logdet += 0.5 * h * (div0 + div1)
        else:  # classic fourth-order Runge-Kutta on the augmented state (x, log-det)
            sm = 0.5 * (s0 + s1)
            k1, d1 = field(x, s0)
            k2, d2 = field(x + 0.5 * h * k1, sm)
            k3, d3 = field(x + 0.5 * h * k2, sm)
            k4, d4 = field(x + h * k3, s1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            logdet += h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    log_prior = -0.5 * x.reshape(batch, -1).pow(2).sum(1) / sigma_max**2 - 0.5 * dim * (
        LOG_2PI + 2 * math.log(sigma_max)
    )
    return -(log_prior + logdet)
