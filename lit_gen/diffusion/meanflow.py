"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447). ALGORITHMS.md §11.

Flow-matching path z_t = (1 − t) x + t ε, ε ~ N(0, I), t ∈ [0, 1], with the conditional velocity v = ε − x. The
network models the *average* velocity over [r, t] (MeanFlow eq. 3),

    u(z_t, r, t) = (t − r)⁻¹ ∫_r^t v(z_τ, τ) dτ,       so   z_r = z_t − (t − r) u(z_t, r, t),

and is trained through the MeanFlow identity (eq. 6), a JVP along the tangent (v, 0, 1) of (z, r, t):

    u_tgt = v − (t − r) (v ∂_z u_θ + ∂_t u_θ),     L = ‖u_θ(z_t, r, t) − sg(u_tgt)‖²             (eqs. 8–10)

with the adaptive weight w = 1/(‖Δ‖² + c)^p (stop-gradient; p = 1, c = 1e-3, Sec. 4.3) and (r, t) drawn from a
logit-normal, r = t for a fraction of the batch (flow matching proper; the paper's default: 75 %). One step
(1-NFE) is x = z₁ − u_θ(z₁, 0, 1); two steps go 1 → 0.5 → 0 (Sec. 5).

Coordinates: a MeanFlow model works in flow coordinates (z_t, t), not lit_gen's EDM ones; its ``denoise(net, z, t,
label, r=...)`` is the jump z_t → z_r (r = 0 gives x̂), and the sampler ``sample_meanflow`` walks a t grid that starts
at t = 1 (so the lit_gen sampler's x = σ₀ · N(0, I) is exactly z₁ = ε). The network takes t as ``c_noise`` and t − r
as its second time input ``c_aux`` (the paper's best (t, t − r) conditioning, Table 1c), both times ``time_scale``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, compute_dtype
from lit_gen.diffusion.trigflow import math_attention
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

JVP_MODES = ("autograd", "finite")
TANGENTS = ("conditional", "predicted")
"""The z-tangent of the JVP: MeanFlow's conditional velocity ε − x (Geng et al. 2025, eq. 8), or the network's own
instantaneous velocity u_θ(z_t, t, t) (improved MeanFlow, Geng et al. 2025b, arXiv 2512.02012, Sec. 4.1 / Alg. 1:
the loss becomes ‖u_θ + (t − r) sg(du_θ/dt) − (ε − x)‖², a regression of a function of z_t alone onto ε − x)."""

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``u(z, r, t) -> u``: a MeanFlow network with its label bound (r, t of shape [B])."""


def flow_noise(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 − t) x + t ε (MeanFlow eq. 1, the rectified-flow path). ``t``: [B]."""
    tb = append_dims(t, x.ndim)
    return (1 - tb) * x + tb * eps


class MeanFlow(Configurable):
    """The MeanFlow parameterisation: a net ``net(z, c_noise, label, c_aux)`` read as u(z, r, t).

    Args:
        time_scale: factor of t and t − r at the network's time inputs (1 for Fourier features; ~1000 for the
            DDPM-style positional embeddings of a UNet/DiT).
    """

    kind = "meanflow"
    sigma_min = 1e-3  # the sampler's t range (flow coordinates: t = 1 is pure noise); used only without a grid
    sigma_max = 1.0

    def __init__(self, time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise LitGenError(f"MeanFlow time_scale must be positive, got {time_scale}")
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return f"MeanFlow(time_scale={self.time_scale!r})"

    def u(self, net: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, label: Tensor | None = None) -> Tensor:
        """u_θ(z, r, t): the net at c_noise = time_scale · t, c_aux = time_scale · (t − r). ``r``, ``t``: [B]."""
        return net(z, self.time_scale * t, label, self.time_scale * (t - r))

    def bind(self, net: Callable[..., Tensor], label: Tensor | None = None) -> AverageVelocity:
        """``u(z, r, t)`` with the label bound: the function the JVP differentiates."""
        return lambda z, r, t: self.u(net, z, r, t, label)

    def denoise(
        self,
        net: Callable[..., Tensor],
        z: Tensor,
        t: Tensor | float,
        label: Tensor | None = None,
        r: Tensor | float | None = None,
    ) -> Tensor:
        """The jump z_r = z_t − (t − r) u_θ(z_t, r, t) (MeanFlow eq. 4); ``r`` None = 0, i.e. x̂ in one step.
        Flow coordinates: ``z`` on the path at time ``t`` (not EDM's x, σ)."""
        dtype = compute_dtype(z)
        z = z.to(dtype)
        t = torch.as_tensor(t, device=z.device, dtype=dtype).reshape(-1).expand(z.shape[0])
        r = torch.zeros_like(t) if r is None else torch.as_tensor(r, device=z.device, dtype=dtype).reshape(-1)
        r = r.expand(z.shape[0])
        return z - append_dims(t - r, z.ndim) * self.u(net, z, r, t, label).to(dtype)

    def sample_times(
        self,
        n: int,
        p_mean: float,
        p_std: float,
        ratio_r_neq_t: float,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """(r, t): two logit-normal draws sigmoid(N(P_mean, P_std²)), t the larger; then r = t except for a random
        ``ratio_r_neq_t`` of the samples (MeanFlow Sec. 4.3, Table 1a: 25 % r ≠ t is the default). Shapes [n]."""
        a = torch.sigmoid(torch.randn(2, n, device=device, generator=generator, dtype=dtype) * p_std + p_mean)
        t, r = a.max(dim=0).values, a.min(dim=0).values
        keep = torch.rand(n, device=device, generator=generator, dtype=dtype) < ratio_r_neq_t
        return torch.where(keep, r, t), t


def average_velocity_tangent(
    fn: AverageVelocity,
    z: Tensor,
    r: Tensor,
    t: Tensor,
    v: Tensor,
    mode: str = "autograd",
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """(u_θ(z, r, t), du_θ/dt) with du/dt = v ∂_z u + ∂_t u, the JVP along (v, 0, 1) (MeanFlow eq. 8).

    "autograd": ``torch.func.jvp``. "finite": the central difference (u(z + εv, r, t + ε) − u(z − εv, r, t − ε))/2ε
    (FastGen's fallback), the primal a third evaluation. Run under ``torch.no_grad`` (the target is stop-gradient).
    """
    if mode == "autograd":
        with math_attention():
            return torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    if mode == "finite":
        tb = torch.full_like(t, eps)
        plus, minus = fn(z + eps * v, r, t + tb), fn(z - eps * v, r, t - tb)
        return fn(z, r, t), (plus - minus) / (2 * eps)
    raise LitGenError(f"unknown jvp mode {mode!r}; choose one of: {', '.join(JVP_MODES)}")


def meanflow_target(v: Tensor, du_dt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """u_tgt = v − (t − r) du/dt (MeanFlow eq. 10); r = t gives v (flow matching)."""
    return v - append_dims(t - r, v.ndim) * du_dt


def meanflow_loss(u: Tensor, u_tgt: Tensor, power: float = 1.0, const: float = 1e-3) -> Tensor:
    """Per-sample adaptively weighted loss sg(w) · ‖Δ‖², Δ = u − sg(u_tgt), w = 1/(‖Δ‖² + c)^p (MeanFlow Sec. 4.3,
    ‖·‖² summed over the data dims as in the paper's eq. 9); p = 0 is the plain squared error. Shape [B]."""
    delta = u - u_tgt.detach()
    sq = (delta**2).reshape(delta.shape[0], -1).sum(dim=1)
    if power == 0:
        return sq
    weight = 1.0 / (sq.detach() + const) ** power
    return weight * sq


def sample_meanflow(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    label: Tensor | None = None,
) -> Tensor:
    """Few-step MeanFlow sampling (MeanFlow Alg. 2): from z at t_0 = ``sigmas[0]`` (1: pure noise), for each next
    time r of the descending grid, z ← z − (t − r) u(z, r, t). One evaluation per step. ``denoiser`` is
    ``MeanFlow.denoise`` with the net bound: ``denoiser(z, t, label, r=r)``."""
    grid = [float(v) for v in torch.as_tensor(sigmas).detach().cpu().tolist()]
    if len(grid) < 2 or any(b >= a for a, b in zip(grid[:-1], grid[1:], strict=False)):
        raise LitGenError(f"MeanFlow sampling needs a strictly descending time grid, got {grid}")
    dtype = compute_dtype(x)
    for t, r in zip(grid[:-1], grid[1:], strict=True):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
        x = denoiser(x, tt, label, r=torch.full_like(tt, r))
    return x
