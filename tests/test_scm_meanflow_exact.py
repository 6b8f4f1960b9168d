"""The one- and two-step samplers of sCM and MeanFlow fed the *ideal* functions of a 2-D Gaussian mixture (the
exact consistency function and the exact average velocity, from the exact PF-ODE): they must reproduce the mixture.
This separates sampler / parameterisation / time-convention defects from optimisation (issue 19: the trained toy
students miss the bar; these pass, so the samplers, t_max, the EDM↔TrigFlow map and MeanFlow's (r, t) convention are
not the cause)."""

from __future__ import annotations

import math

import torch

from lit_gen.data.builtin import mixture_metrics
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.diffusion.meanflow import MeanFlow
from lit_gen.diffusion.samplers import sample, sample_heun
from lit_gen.diffusion.trigflow import TrigFlow
from tests.exact_mixture import F64, exact_denoiser, model_space_mixture, ode_to_zero

MIX = model_space_mixture()
D = exact_denoiser(MIX)


def _check(points: torch.Tensor) -> None:
    m = mixture_metrics(points.numpy(), MIX)
    assert m["mode_tv"] < 0.04 and m["off_mode"] < 0.04 and m["modes_covered"] == 5, m


def test_ideal_trigflow_consistency_function_samples_the_mixture_in_one_and_two_steps() -> None:
    param = TrigFlow()  # σ_d = 0.5, "edm" time conditioning, t_max = arctan(80/0.5)

    def net(x_in: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The 'network' whose consistency function is exact: F = (cos t x_t − f*)/(σ_d sin t), returned as
        −F ("edm" conditioning: an EDM network's sign), t recovered from c_noise = ln(σ_d tan t)/4."""
        sigma = float(torch.exp(4 * c_noise.to(F64)).reshape(-1)[0])
        t = math.atan2(sigma, param.sigma_data)
        x_t = x_in.to(F64) * param.sigma_data
        f_star = ode_to_zero(D, x_t / math.cos(t), sigma)
        return -(math.cos(t) * x_t - f_star) / (param.sigma_data * math.sin(t))

    grid = torch.tensor(param.sampling_grid(1.1), dtype=F64)
    for sigmas in (grid[[0, 2]], grid):  # 1 step: f at t_max; 2 steps: re-noise to t = 1.1
        x = sample(
            lambda x, s, label=None: param.denoise(net, x, s, label),
            (3000, 2),
            sampler="consistency",
            sigmas=sigmas,
            sigma_min=param.sigma_min,
            generator=torch.Generator().manual_seed(0),
            dtype=F64,
        )
        _check(x)


def test_ideal_average_velocity_samples_the_mixture_in_one_and_two_steps() -> None:
    param = MeanFlow()

    def z_at(z: torch.Tensor, t: float, r: float) -> torch.Tensor:
        """z_r on the exact PF-ODE from z_t (flow path z_t = (1 − t) x + t ε ⇔ EDM x = z_t/(1 − t), σ = t/(1 − t))."""
        t = min(t, 1 - 1e-5)  # t = 1 is σ = ∞: start a hair below it (z_1 = ε in both)
        x = ode_to_zero(D, z.to(F64) / (1 - t), t / (1 - t)) if r == 0 else None
        if x is None:  # integrate to σ_r instead of 0
            grid = karras_sigmas(48, r / (1 - r), t / (1 - t), 7.0, dtype=F64)[:-1]
            x = sample_heun(D, z.to(F64) / (1 - t), grid) * (1 - r)
        return x

    def net(z: torch.Tensor, c_noise: torch.Tensor, label=None, c_aux=None) -> torch.Tensor:
        """u*(z, r, t) = (z_t − z_r)/(t − r) with t = c_noise, r = t − c_aux (time_scale 1)."""
        t = float(c_noise.reshape(-1)[0])
        r = t - float(c_aux.reshape(-1)[0])
        return (z.to(F64) - z_at(z, t, r)) / (t - r)

    for grid in ([1.0, 0.0], [1.0, 0.5, 0.0]):
        x = sample(
            lambda z, t, label=None, r=None: param.denoise(net, z, t, label, r=r),
            (3000, 2),
            sampler="meanflow",
            sigmas=torch.tensor(grid, dtype=F64),
            generator=torch.Generator().manual_seed(0),
            dtype=F64,
        )
        _check(x)
