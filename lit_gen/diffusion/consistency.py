"""Consistency models: the boundary-exact parameterisation, discretisations, distances and the multistep sampler.

Song et al. 2023 ("Consistency Models", CM) and Song & Dhariwal 2023 ("Improved Techniques for Training Consistency
Models", iCT); ALGORITHMS.md §4. Pure math: no Lightning, the networks are arguments.

- ``ConsistencyParam``: f_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, c_noise(σ)) with the σ_min-shifted
  c_skip/c_out of CM Appendix C, so f_θ(x, σ_min) = x for any network (the boundary condition). It is a
  ``Configurable`` parameterisation like ``EDM``: a student checkpoint describes it and ``lit_gen.export`` rebuilds
  it, its ``denoise`` is f.
- ``consistency_grid``: the N boundaries σ_min = σ_0 < … < σ_{N−1} = σ_max (CM eq. 5's Karras discretisation).
- ``ict_num_scales`` / ``ict_sigma_probs`` / ``ict_loss_weight``: iCT's doubling curriculum N(k), discretised
  log-normal choice of the interval and λ(σ_i) = 1/(σ_{i+1} − σ_i) (iCT Sec. 3.1, 3.4, 3.5).
- ``DISTANCES``: the metric d(·, ·) table (L2, L1, pseudo-Huber, LPIPS when its weights are on disk).
- ``ode_step``: one probability-flow ODE step of a teacher denoiser (Euler or Heun, EDM Alg. 1), the x̂^φ of CD.
- ``sample_consistency``: multistep consistency sampling (CM Alg. 1), the ``"consistency"`` sampler of
  ``lit_gen.diffusion.samplers.SAMPLERS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, compute_dtype
from lit_gen.diffusion.edm import EDM
from lit_gen.diffusion.grids import karras_sigmas
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


# ------------------------------------------------------------------------------------------- parameterisation
class ConsistencyParam(Configurable):
    """The consistency function's parameterisation (CM Appendix C, eq. 27; ALGORITHMS.md §4).

    c_skip(σ) = σ_d² / ((σ − σ_min)² + σ_d²), c_out(σ) = (σ − σ_min) σ_d / √(σ² + σ_d²): c_skip(σ_min) = 1 and
    c_out(σ_min) = 0 exactly, so f(x, σ_min) = x whatever F returns. c_in and c_noise are EDM's (Table 1), so a
    student initialised from an EDM teacher sees the inputs the teacher was trained on.

    Args:
        sigma_data: standard deviation of the data (the teacher's; 0.5 for images in [-1, 1]).
        sigma_min: σ_min, the noise level where f is the identity (CM: 0.002).
        sigma_max: σ_max, where one-step sampling starts (CM: 80).
    """

    kind = "consistency"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not sigma_data > 0:
            raise LitGenError(f"consistency sigma_data must be positive, got {sigma_data}")
        if not 0 < sigma_min < sigma_max:
            raise LitGenError(f"consistency models need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @classmethod
    def from_teacher(cls, param: object) -> ConsistencyParam:
        """The consistency parameterisation matching a teacher's EDM settings (σ_d, σ_min, σ_max)."""
        if getattr(param, "kind", "") != "edm":
            raise LitGenError(
                f"consistency distillation needs an EDM teacher (VE coordinates, sigma_min/sigma_data); got {param!r}"
            )
        return cls(sigma_data=param.sigma_data, sigma_min=param.sigma_min, sigma_max=param.sigma_max)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    def c_skip(self, sigma: Tensor) -> Tensor:
        """c_skip(σ) = σ_d² / ((σ − σ_min)² + σ_d²) (CM eq. 27): exactly 1 at σ = σ_min."""
        sd2 = self.sigma_data**2
        return sd2 / ((sigma - self.sigma_min) ** 2 + sd2)

    def c_out(self, sigma: Tensor) -> Tensor:
        """c_out(σ) = (σ − σ_min) σ_d / √(σ² + σ_d²) (CM eq. 27): exactly 0 at σ = σ_min."""
        return (sigma - self.sigma_min) * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma: Tensor) -> Tensor:
        """c_in(σ) = 1 / √(σ² + σ_d²) (EDM Table 1, used unchanged by CM)."""
        return torch.rsqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """c_noise(σ) = ln(σ) / 4 (EDM Table 1; CM's code feeds 1000·ln(σ)/4 to its own embedding)."""
        return torch.log(sigma) / 4

    # f(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) (CM eq. 27): EDM's preconditioned denoiser with the
    # σ_min-shifted scalings above, so the same code serves both.
    denoise = EDM.denoise


# --------------------------------------------------------------------------------------------- discretisation
def consistency_grid(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The N boundaries σ_0 = σ_min < … < σ_{N−1} = σ_max, σ_i = (σ_min^{1/ρ} + i/(N−1)(σ_max^{1/ρ} −
    σ_min^{1/ρ}))^ρ (CM Sec. 3 / eq. 5, EDM's grid read upwards). Shape [N], ascending, endpoints exact."""
    if n < 2:
        raise LitGenError(f"a consistency grid needs at least 2 noise levels, got N = {n}")
    return karras_sigmas(n, sigma_min, sigma_max, rho, dtype=torch.float64)[:-1].flip(0).to(dtype)


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum (iCT eq. 8 / Sec. 3.4): N(k) = min(s0 · 2^⌊k/K'⌋, s1) + 1 with
    K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (no floor on the log2: for s1/s0 not a power of two the stages are shorter, e.g.
    K = 12345, s0 = 10, s1 = 1000 gives K' = 1615 and N = 1001 for the last 1040 steps). For s0 = 10, s1 = 1280:
    11, 21, 41, …, 1281, each for K/8 steps."""
    if total_steps < 1 or s0 < 1 or s1 < s0:
        raise LitGenError(f"iCT curriculum needs total_steps >= 1 and 1 <= s0 <= s1, got {total_steps}, {s0}, {s1}")
    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ict_sigma_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Discretised log-normal choice of the interval [σ_i, σ_{i+1}] (iCT Sec. 3.5): p(i) ∝
    erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)). ``sigmas`` ascending [N]; shape
    [N − 1], sums to 1."""
    log = torch.log(sigmas.to(torch.float64))
    cdf = torch.erf((log - p_mean) / (math.sqrt(2.0) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def ict_loss_weight(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """λ(σ_i) = 1 / (σ_{i+1} − σ_i) (iCT Sec. 3.1): larger weight on the short intervals near the data."""
    return 1.0 / (sigma_next - sigma)


# ---------------------------------------------------------------------------------------------------- distances
def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) = ‖a − b‖² / dim per sample (CM Sec. 5's squared ℓ2, averaged over elements as CM's code). [B]."""
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(dim=1)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) = ‖a − b‖₁ / dim per sample (CM Sec. 5). [B]."""
    return (a - b).abs().reshape(a.shape[0], -1).mean(dim=1)


def pseudo_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 √d (iCT Sec. 3.3, d = data dimensionality)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber_distance(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """d(a, b) = √(‖a − b‖² + c²) − c on the whole vector (iCT eq. 7; not element-wise, ALGORITHMS.md §6).
    ``c`` None = 0.00054 √dim. [B]."""
    diff = (a - b).reshape(a.shape[0], -1)
    c = pseudo_huber_c(diff.shape[1]) if c is None else c
    return torch.sqrt(diff.pow(2).sum(dim=1) + c * c) - c


LPIPS_BACKBONE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file name


def lpips_backbone_path() -> Path:
    """Where torchvision looks for the VGG16 weights LPIPS needs (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE


class LPIPSDistance:
    """LPIPS-VGG (Zhang et al. 2018) as CM uses it: both images bilinearly resized to 224², values in [−1, 1].

    Built on torchmetrics' LPIPS module (its linear-layer weights ship with torchmetrics); the VGG16 backbone comes
    from torchvision's cache and is never downloaded here. Grey-scale images are repeated to 3 channels.
    """

    def __init__(self) -> None:
        path = lpips_backbone_path()
        if not path.is_file():
            raise LitGenError(
                f"the LPIPS distance needs torchvision's VGG16 weights at {path} (no download here); put "
                f"{LPIPS_BACKBONE} there or use distance pseudo_huber"
            )
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.module = _NoTrainLpips(net="vgg", resize=224).requires_grad_(False)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        if a.ndim != 4 or a.shape[1] not in (1, 3):
            raise LitGenError(f"LPIPS needs images [B, 1 or 3, H, W], got shape {list(a.shape)}")
        self.module.to(a.device)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        return self.module(a.float(), b.float()).reshape(a.shape[0])


@dataclass(frozen=True)
class DistanceSpec:
    """One row of the distance table: a factory of d(a, b) -> [B] and a summary."""

    make: Callable[[], Callable[[Tensor, Tensor], Tensor]]
    description: str


DISTANCES: dict[str, DistanceSpec] = {
    "l2": DistanceSpec(lambda: l2_distance, "squared L2 averaged over elements (CM)"),
    "l1": DistanceSpec(lambda: l1_distance, "L1 averaged over elements (CM)"),
    "pseudo_huber": DistanceSpec(lambda: pseudo_huber_distance, "√(‖a−b‖² + c²) − c, c = 0.00054√dim (iCT)"),
    "lpips": DistanceSpec(LPIPSDistance, "LPIPS-VGG at 224² (CM); needs torchvision's VGG16 weights on disk"),
}


def get_distance(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The distance function named ``name`` (a one-line ``LitGenError`` naming the valid ones otherwise)."""
    if name not in DISTANCES:
        raise LitGenError(f"unknown distance {name!r}; choose one of: {', '.join(DISTANCES)}")
    return DISTANCES[name].make()


# ------------------------------------------------------------------------------------------------ teacher step
def ode_step(denoiser: Denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, label: Tensor | None, solver: str):
    """One probability-flow ODE step dx/dσ = (x − D(x; σ))/σ from σ to σ_next (per-sample [B] tensors, > 0):
    CD's x̂^φ_{n} (CM eq. 6 / Alg. 2). "euler": x + (σ' − σ) d; "heun": averaged with the slope at the Euler
    point (EDM Alg. 1, 2nd order: local error O(Δσ³))."""
    if solver not in ODE_SOLVERS:
        raise LitGenError(f"unknown teacher solver {solver!r}; choose one of: {', '.join(ODE_SOLVERS)}")
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    d = (x - denoiser(x, sigma, label)) / s
    x_next = x + (s_next - s) * d
    if solver == "heun":
        d_next = (x_next - denoiser(x_next, sigma_next, label)) / s_next
        x_next = x + (s_next - s) * 0.5 * (d + d_next)
    return x_next


ODE_SOLVERS = ("euler", "heun")


# ------------------------------------------------------------------------------------------------------ sampling
def sample_consistency(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    label: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
) -> Tensor:
    """Multistep consistency sampling (CM Alg. 1): x ← f(x, σ_0) from x = σ_0 z, then for every later σ_i > 0 of
    the descending ``sigmas``: x ← f(x + √(σ_i² − σ_min²) z, σ_i). A trailing 0 (the grids' end point) is
    skipped, so the K-step schedule [σ_max, …, σ_{K−1}, 0] costs K evaluations. ``denoiser`` is f (a
    ``ConsistencyParam.denoise``); the fresh noise z is drawn with ``generator``. ``sigma_min`` is the consistency
    model's boundary σ (the ε of CM); for an ordinary diffusion denoiser this is a "denoise, renoise" sampler.
    """
    grid = [float(v) for v in torch.as_tensor(sigmas).detach().cpu().tolist()]
    if len(grid) < 1 or any(b > a for a, b in zip(grid[:-1], grid[1:], strict=False)):
        raise LitGenError(f"consistency sampling needs a descending sigma schedule, got {grid}")
    sigma_at = torch.full((x.shape[0],), grid[0], device=x.device, dtype=compute_dtype(x))
    x = denoiser(x, sigma_at, label)
    for s in grid[1:]:
        if s <= 0:
            continue
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = x + math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) * z
        x = denoiser(x, torch.full_like(sigma_at, s), label)
    return x
