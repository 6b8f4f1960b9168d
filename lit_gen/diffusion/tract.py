"""TRACT and binary time-distillation: the pure target maths (no Lightning).

TRACT (Berthelot et al. 2023, "TRACT: Denoising Diffusion Models with Transitive Closure Time-Distillation", Alg. 1
and Sec. 3) and binary time-distillation (progressive distillation, Salimans & Ho 2022, Alg. 2) share one picture:

- a base grid of T teacher steps, σ_0 = σ_max > σ_1 > … > σ_T = 0 (index i counts steps *down* from pure noise);
- a phase schedule S_0 = T > S_1 > … > S_P: in phase p one teacher step spans T/S_p grid units and one student step
  (a *segment*) spans T/S_{p+1} units, so the student learns S_{p+1}-step sampling;
- per sample a segment [top, s] and a time t on the phase's teacher grid inside it; x_t = y + σ_t n;
  x_t1 = one teacher step t → t1 (t1 = t + one teacher step), then x_s = the second hop t1 → s (identity when t1 = s);
- the target x̃ is the x̂ whose single DDIM step from x_t lands exactly on x_s (ALGORITHMS.md §2–3):
  in VE coordinates x̃ = (σ_t x_s − σ_s x_t)/(σ_t − σ_s); in VP coordinates (z = α x_ve, σ_vp = α σ_ve)
  x̃ = (z_t σ_s − z_s σ_t)/(α_t σ_s − α_s σ_t) (TRACT Alg. 1; Salimans & Ho 2022, Alg. 2 "x̃"), the same number.

The two methods differ only in the ``TARGETS`` row: TRACT draws t anywhere in the segment and makes the second hop
with the self-teacher (an EMA of the student, µ_S = 0.5) — the "transitive closure"; BTD draws t at the segment top
and makes both hops with the teacher, segments being exactly two teacher steps (one phase per halving).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_gen.diffusion.broadcast import append_dims
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.errors import LitGenError

TARGETS: dict[str, str] = {
    "tract": "TRACT (Berthelot et al. 2023, Alg. 1): t anywhere in the segment on the teacher grid; one teacher step "
    "t → t1, then the self-teacher (EMA of the student) jumps t1 → s",
    "btd": "binary time-distillation (Salimans & Ho 2022, Alg. 2): t at the segment top, two teacher steps "
    "t → t1 → s; segments of exactly two teacher steps, one phase per halving",
}
GRIDS: dict[str, str] = {
    "karras": "EDM grid σ_i = (σ_max^{1/ρ} + i/(T−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, σ_T = 0 (Karras et al. 2022, eq. 5;"
    " TRACT's EDM runs, T = 40)",
    "cosine": "uniform t on the VP cosine schedule, σ_ve(t) = exp(−λ(t)/2), t_i = 1 − i/T (Salimans & Ho 2022; "
    "TRACT's VP runs, T = 1024)",
}
TEACHER_SOLVERS: dict[str, str] = {
    "euler": "one DDIM step = Euler x̂-jump x̂ + (σ_s/σ_t)(x − x̂) (Song et al. 2021, eq. 12; VP teachers)",
    "heun": "one Heun step (Karras et al. 2022, Alg. 2; Euler when σ_s = 0) — TRACT's EDM teacher step",
}

Hop = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
"""``hop(x, sigma_from, sigma_to, label) -> x'``: one ODE step between per-sample noise levels ([B] tensors)."""
DenoiseFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


# ------------------------------------------------------------------------------------------------ phase schedule
@dataclass(frozen=True)
class PhaseSchedule:
    """The phase arithmetic of TRACT (Berthelot et al. 2023, Sec. 3.2) and BTD (Salimans & Ho 2022, Alg. 2).

    Args:
        steps: S_0 > S_1 > … > S_P sampling steps; S_0 = T is the teacher grid, each S_{p+1} divides S_p.
        updates: optimizer steps of each phase (P numbers).
    """

    steps: tuple[int, ...]
    updates: tuple[int, ...]

    @classmethod
    def from_config(cls, schedule: Sequence[int], steps_per_phase: int | Sequence[int]) -> PhaseSchedule:
        """Validate recipe numbers: ``schedule`` [S_0, …, S_P], ``steps_per_phase`` one int or P ints."""
        steps = tuple(int(s) for s in schedule)
        if len(steps) < 2 or any(s < 1 for s in steps):
            raise LitGenError(f"schedule needs at least two positive step counts (e.g. [40, 1]), got {list(steps)}")
        for a, b in zip(steps[:-1], steps[1:], strict=True):
            if not b < a or a % b:
                raise LitGenError(
                    f"schedule {list(steps)}: each step count must be smaller than and divide the previous one "
                    f"({b} after {a})"
                )
        n = len(steps) - 1
        updates = (int(steps_per_phase),) * n if isinstance(steps_per_phase, int) else tuple(steps_per_phase)
        if len(updates) != n or any(u < 1 for u in updates):
            raise LitGenError(
                f"steps_per_phase must be one positive int or {n} of them (one per phase of {list(steps)}), "
                f"got {steps_per_phase}"
            )
        return cls(steps, tuple(int(u) for u in updates))

    @property
    def num_phases(self) -> int:
        return len(self.steps) - 1

    @property
    def base_steps(self) -> int:
        """T, the number of steps of the base (teacher) grid."""
        return self.steps[0]

    @property
    def total_updates(self) -> int:
        return sum(self.updates)

    def phase_start(self, phase: int) -> int:
        """Optimizer step at which ``phase`` begins."""
        return sum(self.updates[:phase])

    def phase_at(self, step: int) -> int:
        """The phase that optimizer step ``step`` (0-based) belongs to; steps past the end stay in the last phase."""
        for phase in range(self.num_phases):
            if step < self.phase_start(phase + 1):
                return phase
        return self.num_phases - 1

    def teacher_stride(self, phase: int) -> int:
        """Grid units of one teacher step in ``phase``: T / S_p."""
        return self.base_steps // self.steps[phase]

    def segment_stride(self, phase: int) -> int:
        """Grid units of one student step (segment) in ``phase``: T / S_{p+1}."""
        return self.base_steps // self.steps[phase + 1]

    def student_steps(self, phase: int) -> int:
        """S_{p+1}: the number of steps the student of ``phase`` samples with."""
        return self.steps[phase + 1]

    def sample_indices(
        self, phase: int, batch: int, target: str, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Grid indices (t, t1, s), each [B] long on the CPU, for one batch of ``phase``.

        A segment k ~ U{0..S_{p+1}−1} spans top = k·seg to s = top + seg. TRACT: t = top + j·teach,
        j ~ U{0..seg/teach − 1} (any teacher-grid time inside the segment, tc_distill.py); BTD: t = top.
        t1 = t + teach (one teacher step later, towards the data).
        """
        if target not in TARGETS:
            raise LitGenError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        teach, seg = self.teacher_stride(phase), self.segment_stride(phase)
        top = torch.randint(0, self.student_steps(phase), (batch,), generator=generator) * seg
        t = top
        if target == "tract":
            t = top + torch.randint(0, seg // teach, (batch,), generator=generator) * teach
        return t, t + teach, top + seg

    def student_grid(self, grid: Tensor, phase: int) -> list[float]:
        """The σ points the student of ``phase`` jumps between (segment boundaries, descending, ending at 0)."""
        return [float(v) for v in grid[:: self.segment_stride(phase)].tolist()]


def check_target(target: str, schedule: PhaseSchedule) -> None:
    """BTD's segments are exactly two teacher steps: each step count of the schedule halves the previous one."""
    if target not in TARGETS:
        raise LitGenError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "btd" and any(a != 2 * b for a, b in zip(schedule.steps[:-1], schedule.steps[1:], strict=True)):
        raise LitGenError(
            f"target 'btd' halves the steps every phase (e.g. [64, 32, 16, 8, 4, 2, 1]); got {list(schedule.steps)}"
        )


# ---------------------------------------------------------------------------------------------------- base grid
def base_grid(param: object, steps: int, kind: str, rho: float = 7.0) -> Tensor:
    """The teacher grid [T + 1] in float64, descending VE noise levels ending at exactly 0 (see ``GRIDS``)."""
    if kind == "karras":
        return karras_sigmas(steps, param.sigma_min, param.sigma_max, rho, dtype=torch.float64)
    if kind == "cosine":
        if not hasattr(param, "sigmas_uniform_t"):
            raise LitGenError("grid 'cosine' needs a VP teacher (lit_gen.diffusion.VP); use grid 'karras' for EDM")
        return param.sigmas_uniform_t(steps, dtype=torch.float64)
    raise LitGenError(f"unknown grid {kind!r}; choose one of {', '.join(GRIDS)}")


# ------------------------------------------------------------------------------------------------------ ODE hops
def euler_jump(x: Tensor, x_hat: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
    """x_s = x̂ + (σ_s/σ_t)(x_t − x̂): a DDIM step in VE coordinates (Song et al. 2021, eq. 12 with η = 0;
    ALGORITHMS.md §1.2), = an Euler step of the probability-flow ODE; σ_s = 0 returns x̂."""
    ratio = append_dims(sigma_s / sigma_t, x.ndim)
    return x_hat + ratio * (x - x_hat)


def clip_denoised(x_hat: Tensor, clip: float | None) -> Tensor:
    """x̂ clipped to [−clip, clip] inside DDIM steps (TRACT reference code, both variants); None = no clipping."""
    return x_hat if clip is None else x_hat.clamp(-clip, clip)


def teacher_step(
    denoise: DenoiseFn,
    x: Tensor,
    sigma_t: Tensor,
    sigma_s: Tensor,
    label: Tensor | None = None,
    *,
    solver: str = "euler",
    clip: float | None = None,
) -> Tensor:
    """One teacher ODE step σ_t → σ_s (per-sample [B] levels, σ_t > σ_s ≥ 0), see ``TEACHER_SOLVERS``.

    Euler: x̂ = clip(D(x; σ_t)), x_s = x̂ + (σ_s/σ_t)(x − x̂). Heun (Karras et al. 2022, Alg. 2 lines 5–8, no churn):
    d = (x − D(x; σ_t))/σ_t, x' = x + (σ_s − σ_t) d, and where σ_s > 0 the slope is averaged with
    d' = (x' − D(x'; σ_s))/σ_s; the corrector is evaluated only on those rows. Heun does not clip (the reference's
    EDM teacher step does not).
    """
    if solver not in TEACHER_SOLVERS:
        raise LitGenError(f"unknown teacher solver {solver!r}; choose one of {', '.join(TEACHER_SOLVERS)}")
    x_hat = denoise(x, sigma_t, label)
    if solver == "euler":
        return euler_jump(x, clip_denoised(x_hat, clip), sigma_t, sigma_s)
    h = append_dims(sigma_s - sigma_t, x.ndim)
    d = (x - x_hat) / append_dims(sigma_t, x.ndim)
    x_next = x + h * d
    rows = sigma_s > 0
    if bool(rows.any()):
        lab = label[rows] if label is not None else None
        xr, sr = x_next[rows], sigma_s[rows]
        d_next = (xr - denoise(xr, sr, lab)) / append_dims(sr, x.ndim)
        x_next = x_next.clone()
        x_next[rows] = x[rows] + h[rows] * 0.5 * (d[rows] + d_next)
    return x_next


def denoiser_hop(denoise: DenoiseFn, *, solver: str = "euler", clip: float | None = None) -> Hop:
    """A ``Hop`` that takes one ``teacher_step`` of ``denoise``."""

    def hop(x: Tensor, sigma_from: Tensor, sigma_to: Tensor, label: Tensor | None) -> Tensor:
        return teacher_step(denoise, x, sigma_from, sigma_to, label, solver=solver, clip=clip)

    return hop


# ------------------------------------------------------------------------------------------------------- targets
def tract_target(x_t: Tensor, x_s: Tensor, sigma_t: Tensor, sigma_s: Tensor) -> Tensor:
    """x̃ = (σ_t x_s − σ_s x_t)/(σ_t − σ_s) in VE coordinates (TRACT, EDM variant; ALGORITHMS.md §3): the x̂ whose
    DDIM/Euler step from x_t at σ_t lands on x_s at σ_s (σ_s = 0 gives x̃ = x_s)."""
    st, ss = append_dims(sigma_t, x_t.ndim), append_dims(sigma_s, x_t.ndim)
    return (st * x_s - ss * x_t) / (st - ss)


def tract_target_vp(
    z_t: Tensor, z_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> Tensor:
    """x̃ = (z_t σ_s − z_s σ_t)/(α_t σ_s − α_s σ_t) for VP states z = α x + σ ε (TRACT Alg. 1, tc_distill.py;
    Salimans & Ho 2022 Alg. 2 write it (z_s − (σ_s/σ_t) z_t)/(α_s − (σ_s/σ_t) α_t)). Equals ``tract_target`` on the
    VE states z/α with levels σ/α."""
    at, st, as_, ss = (append_dims(c, z_t.ndim) for c in (alpha_t, sigma_t, alpha_s, sigma_s))
    return (z_t * ss - z_s * st) / (at * ss - as_ * st)


def closure_target(
    first_hop: Hop,
    second_hop: Hop,
    x_t: Tensor,
    sigma_t: Tensor,
    sigma_t1: Tensor,
    sigma_s: Tensor,
    label: Tensor | None = None,
) -> Tensor:
    """The distillation target x̃ (TRACT Alg. 1; BTD with ``second_hop`` = the teacher).

    x_t1 = first_hop(x_t: σ_t → σ_t1); x_s = second_hop(x_t1: σ_t1 → σ_s) on the rows with σ_t1 > σ_s, x_t1 where
    t1 is already the segment end; x̃ = ``tract_target``(x_t, x_s, σ_t, σ_s).
    """
    x_t1 = first_hop(x_t, sigma_t, sigma_t1, label)
    x_s = x_t1
    rows = sigma_t1 > sigma_s
    if bool(rows.any()):
        x_s = x_t1.clone()
        lab = label[rows] if label is not None else None
        x_s[rows] = second_hop(x_t1[rows], sigma_t1[rows], sigma_s[rows], lab)
    return tract_target(x_t, x_s, sigma_t, sigma_s)


def x_loss_weight(param: object, sigma: Tensor) -> Tensor:
    """Per-sample weight w(σ) of ‖x̂ − x̃‖², from the parameterisation.

    EDM: λ(σ) = 1/c_out(σ)², i.e. a unit-weight MSE on F (TRACT's EDM loss, tc_distill_edm.py). VP, SNR = 1/σ_ve²:
    "snr_trunc" max(SNR, 1) (Salimans & Ho 2022 Sec. 4; TRACT's VP loss), "v" 1 + SNR, "eps" SNR.
    """
    if hasattr(param, "loss_weight"):
        return param.loss_weight(sigma)
    snr = sigma.pow(-2)
    weighting = getattr(param, "loss_weighting", "snr_trunc")
    if weighting == "snr_trunc":
        return snr.clamp(min=1.0)
    if weighting == "v":
        return 1.0 + snr
    return snr


# ---------------------------------------------------------------------------------------------------------- EMAs
def ema_weight(momentum: float, update: int) -> float:
    """Interpolation weight of the ``update``-th EMA update (counted from 1) with bias correction:
    (1 − µ)/(1 − µ^k) (Adam-style, as TRACT's ModuleEMA); k = 1 gives 1, i.e. the first update copies."""
    if update < 1:
        raise ValueError(f"EMA updates count from 1, got {update}")
    if momentum == 0.0:
        return 1.0
    return (1.0 - momentum) / (1.0 - momentum**update)


def inference_momentum(residual: float, updates: int) -> float:
    """µ_I = ρ^{1/N}: after N updates the phase's starting weights keep a share ρ (TRACT, ``ema_residual`` 1e-3)."""
    return residual ** (1.0 / updates)


@torch.no_grad()
def ema_update_(average: nn.Module, source: nn.Module, weight: float) -> None:
    """average ← average + weight·(source − average) on floating parameters and buffers; other buffers copied."""
    pairs = list(zip(average.parameters(), source.parameters(), strict=True))
    pairs += list(zip(average.buffers(), source.buffers(), strict=True))
    floats = [(a, s) for a, s in pairs if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [s.detach().to(a.dtype) for a, s in floats], weight)
    for a, s in pairs:
        if not a.is_floating_point():
            a.copy_(s)
