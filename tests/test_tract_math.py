"""TRACT / BTD target maths (ALGORITHMS.md §2–3 invariants), in float64 with an analytic Gaussian teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lit_gen.diffusion import EDM, VP, alpha_sigma, ddim_step, logsnr_from_sigma_ve
from lit_gen.diffusion.tract import (
    PhaseSchedule,
    base_grid,
    check_target,
    closure_target,
    denoiser_hop,
    ema_update_,
    ema_weight,
    euler_jump,
    inference_momentum,
    teacher_step,
    tract_target,
    tract_target_vp,
    x_loss_weight,
)
from lit_gen.errors import LitGenError

MU, S = 0.3, 0.7  # data N(MU, S² I)


def gaussian_denoiser(x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
    """The exact denoiser of N(MU, S² I): D*(x; σ) = MU + S²/(S² + σ²)(x − MU) (ALGORITHMS.md §1.1)."""
    sb = sigma.view(-1, *([1] * (x.ndim - 1)))
    return MU + S**2 / (S**2 + sb**2) * (x - MU)


def gaussian_flow(x: Tensor, sigma_from: Tensor, sigma_to: Tensor, label: Tensor | None = None) -> Tensor:
    """The exact probability-flow solution for N(MU, S² I): x(σ') = MU + √((S²+σ'²)/(S²+σ²))(x − MU)."""
    ratio = torch.sqrt((S**2 + sigma_to**2) / (S**2 + sigma_from**2)).view(-1, *([1] * (x.ndim - 1)))
    return MU + ratio * (x - MU)


def levels(*values: float, batch: int = 5) -> list[Tensor]:
    return [torch.full((batch,), v, dtype=torch.float64) for v in values]


def test_target_round_trips_one_student_step_lands_on_x_s() -> None:
    gen = torch.Generator().manual_seed(0)
    x_t, x_s = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
    )
    sigma_t = torch.tensor([80.0, 3.0, 1.0, 0.5, 0.01], dtype=torch.float64)
    for sigma_s in (sigma_t / 4, torch.zeros(5, dtype=torch.float64)):
        target = tract_target(x_t, x_s, sigma_t, sigma_s)
        torch.testing.assert_close(euler_jump(x_t, target, sigma_t, sigma_s), x_s, rtol=1e-12, atol=1e-10)
    # VP coordinates: one DDIM step of Salimans & Ho / TRACT's code lands on z_s, and the target equals the VE one.
    sigma_s = sigma_t / 4
    (a_t, s_t), (a_s, s_s) = (alpha_sigma(logsnr_from_sigma_ve(s)) for s in (sigma_t, sigma_s))
    z_t, z_s = x_t * a_t[:, None], x_s * a_s[:, None]
    target_vp = tract_target_vp(z_t, z_s, a_t, s_t, a_s, s_s)
    torch.testing.assert_close(ddim_step(z_t, target_vp, a_t, s_t, a_s, s_s), z_s, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(target_vp, tract_target(x_t, x_s, sigma_t, sigma_s), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_one_teacher_step_segment_reduces_to_the_teachers_own_target(solver: str) -> None:
    x_t = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma_t, sigma_s = levels(2.0, 0.9)
    teacher = denoiser_hop(gaussian_denoiser, solver=solver)

    def never(*args: object) -> Tensor:
        raise AssertionError("the self-teacher must not run when t1 is the segment end")

    target = closure_target(teacher, never, x_t, sigma_t, sigma_s, sigma_s)
    torch.testing.assert_close(euler_jump(x_t, target, sigma_t, sigma_s), teacher(x_t, sigma_t, sigma_s, None))
    if solver == "euler":  # the DDIM teacher's target is its own x̂
        torch.testing.assert_close(target, gaussian_denoiser(x_t, sigma_t))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_point_mass_teacher_gives_c(solver: str) -> None:
    c = torch.tensor([0.25, -1.5], dtype=torch.float64)

    def point_mass(x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        return c.expand_as(x)

    x_t = 3.0 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma_t = torch.tensor([5.0, 5.0, 1.0, 1.0, 0.3, 0.3], dtype=torch.float64)
    sigma_t1 = sigma_t / 2
    sigma_s = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.0, 0.15], dtype=torch.float64)  # last: t1 == s
    hop = denoiser_hop(point_mass, solver=solver)
    target = closure_target(hop, denoiser_hop(point_mass), x_t, sigma_t, sigma_t1, sigma_s)
    torch.testing.assert_close(target, c.expand_as(x_t), rtol=0, atol=1e-12)


def test_exact_teacher_and_self_teacher_give_the_exact_segment_jump() -> None:
    """With the exact Gaussian flow for both hops, one student step with x̃ reproduces the exact ODE solution."""
    x_t = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma_t, sigma_t1, sigma_s = levels(4.0, 2.5, 0.0, batch=4)
    target = closure_target(gaussian_flow, gaussian_flow, x_t, sigma_t, sigma_t1, sigma_s)
    torch.testing.assert_close(euler_jump(x_t, target, sigma_t, sigma_s), gaussian_flow(x_t, sigma_t, sigma_s))


def test_heun_teacher_step_is_second_order_on_the_gaussian() -> None:
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors = {}
    for solver in ("euler", "heun"):
        errors[solver] = []
        for h in (0.2, 0.1, 0.05):
            sigma_t, sigma_s = levels(1.0, 1.0 - h, batch=8)
            step = teacher_step(gaussian_denoiser, x, sigma_t, sigma_s, solver=solver)
            errors[solver].append(float((step - gaussian_flow(x, sigma_t, sigma_s)).abs().max()))
    for small, big in zip(errors["heun"][1:], errors["heun"][:-1], strict=True):
        assert 6.0 < big / small < 10.0  # local error O(h³)
    for small, big in zip(errors["euler"][1:], errors["euler"][:-1], strict=True):
        assert 3.0 < big / small < 5.0  # local error O(h²)
    # Heun's last step to σ = 0 is Euler: the teacher's x̂.
    sigma_t, zero = levels(0.5, 0.0, batch=8)
    torch.testing.assert_close(
        teacher_step(gaussian_denoiser, x, sigma_t, zero, solver="heun"), gaussian_denoiser(x, sigma_t)
    )


def test_clip_applies_to_ddim_jumps() -> None:
    def far(x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        return torch.full_like(x, 5.0)

    x, (sigma_t, zero) = torch.zeros(3, 2, dtype=torch.float64), levels(1.0, 0.0, batch=3)
    assert torch.all(teacher_step(far, x, sigma_t, zero, clip=1.0) == 1.0)
    assert torch.all(teacher_step(far, x, sigma_t, zero) == 5.0)


def test_ema_first_update_copies_and_bias_correction_is_a_normalised_average() -> None:
    assert ema_weight(0.5, 1) == 1.0 and ema_weight(0.999, 1) == 1.0
    average, source = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    ema_update_(average, source, ema_weight(0.5, 1))
    for a, s in zip(average.parameters(), source.parameters(), strict=True):
        assert torch.equal(a, s)
    # k bias-corrected updates with values v_1..v_k give Σ µ^{k−i}(1−µ) v_i / (1 − µ^k).
    mu, values = 0.9, [torch.tensor([float(v)], dtype=torch.float64) for v in (3.0, -1.0, 4.0, 1.5)]
    avg = nn.Module()
    avg.w = nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)
    for k, v in enumerate(values, start=1):
        src = nn.Module()
        src.w = nn.Parameter(v, requires_grad=False)
        ema_update_(avg, src, ema_weight(mu, k))
    k = len(values)
    expected = sum(mu ** (k - i) * (1 - mu) * float(v) for i, v in enumerate(values, start=1)) / (1 - mu**k)
    assert math.isclose(float(avg.w), expected, rel_tol=1e-12)
    assert math.isclose(inference_momentum(1e-3, 500) ** 500, 1e-3, rel_tol=1e-9)


def test_phase_boundaries_fall_where_the_schedule_says() -> None:
    phases = PhaseSchedule.from_config([1024, 32, 1], [100, 50])
    assert [phases.phase_at(k) for k in (0, 99, 100, 149, 150, 10**6)] == [0, 0, 1, 1, 1, 1]
    assert phases.total_updates == 150 and phases.phase_start(1) == 100
    assert (phases.teacher_stride(0), phases.segment_stride(0)) == (1, 32)
    assert (phases.teacher_stride(1), phases.segment_stride(1)) == (32, 1024)
    assert PhaseSchedule.from_config([40, 1], 7).updates == (7,)
    gen = torch.Generator().manual_seed(0)
    for phase in (0, 1):
        teach, seg = phases.teacher_stride(phase), phases.segment_stride(phase)
        t, t1, s = phases.sample_indices(phase, 4096, "tract", generator=gen)
        assert torch.all(t % teach == 0) and torch.all(s % seg == 0) and torch.all(t1 == t + teach)
        assert torch.all(t1 <= s) and torch.all(s - t <= seg) and int(s.max()) <= 1024 and int(t.min()) >= 0
        assert len(set((s - t).tolist())) == seg // teach  # every teacher-grid time inside the segment occurs
    btd = PhaseSchedule.from_config([8, 4, 2, 1], 10)
    check_target("btd", btd)
    t, t1, s = btd.sample_indices(2, 512, "btd", generator=gen)
    assert torch.all(s - t == 8) and torch.all(t1 - t == 4)  # t at the segment top, two teacher steps
    for bad in ([8], [8, 8], [8, 3], [1, 2]):
        with pytest.raises(LitGenError, match="schedule"):
            PhaseSchedule.from_config(bad, 10)
    with pytest.raises(LitGenError, match="steps_per_phase"):
        PhaseSchedule.from_config([8, 2, 1], [10])
    with pytest.raises(LitGenError, match="halves"):
        check_target("btd", PhaseSchedule.from_config([64, 8, 1], 10))


def test_grids_and_loss_weights() -> None:
    edm, vp = EDM(), VP()
    grid = base_grid(edm, 40, "karras")
    assert grid.dtype == torch.float64 and grid[0] == 80.0 and grid[-2] == 0.002 and grid[-1] == 0.0
    assert torch.all(grid[:-1] > grid[1:])
    cosine = base_grid(vp, 1024, "cosine")
    assert cosine[-1] == 0.0 and torch.all(cosine[:-1] > cosine[1:])
    with pytest.raises(LitGenError, match="VP"):
        base_grid(edm, 8, "cosine")
    phases = PhaseSchedule.from_config([40, 8, 1], 5)
    assert phases.student_grid(grid, 0) == grid[::5].tolist() and phases.student_grid(grid, 1) == [80.0, 0.0]
    sigma = torch.tensor([0.01, 0.5, 1.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(x_loss_weight(edm, sigma) * edm.c_out(sigma) ** 2, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(x_loss_weight(vp, sigma), torch.clamp(sigma**-2, min=1.0))
