"""Pure diffusion math (no Lightning): parameterisations, losses, noise grids, samplers and guidance.

Everything works on a denoiser ``D(x, sigma, label) -> x0_hat`` in VE coordinates x = y + σ n.
"""

from lit_gen.diffusion.broadcast import append_dims, expand_sigma
from lit_gen.diffusion.edm import EDM, Net
from lit_gen.diffusion.grids import karras_sigmas, schedule_from_grid
from lit_gen.diffusion.guidance import AutoGuidanceDenoiser, CFGDenoiser, guide
from lit_gen.diffusion.samplers import (
    SAMPLERS,
    Denoiser,
    SamplerSpec,
    get_sampler,
    sample,
    sample_ddim,
    sample_euler,
    sample_heun,
)
from lit_gen.diffusion.vp import (
    VP,
    alpha_sigma,
    ddim_step,
    eps_from_v,
    eps_from_x,
    logsnr_cosine,
    logsnr_from_sigma_ve,
    sigma_ve_from_logsnr,
    t_from_logsnr,
    v_from_x_eps,
    x_from_eps,
    x_from_v,
)

__all__ = [
    "EDM",
    "SAMPLERS",
    "VP",
    "AutoGuidanceDenoiser",
    "CFGDenoiser",
    "Denoiser",
    "Net",
    "SamplerSpec",
    "alpha_sigma",
    "append_dims",
    "ddim_step",
    "eps_from_v",
    "eps_from_x",
    "expand_sigma",
    "get_sampler",
    "guide",
    "karras_sigmas",
    "logsnr_cosine",
    "logsnr_from_sigma_ve",
    "sample",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "schedule_from_grid",
    "sigma_ve_from_logsnr",
    "t_from_logsnr",
    "v_from_x_eps",
    "x_from_eps",
    "x_from_v",
]
