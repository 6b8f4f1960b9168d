"""EDM parameterisation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Noising x = y + σ n with n ~ N(0, I) ("variance exploding" coordinates); preconditioned denoiser
D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ)) (EDM Table 1 and eq. 7); training loss
E[λ(σ) ‖D(y + σ n; σ) − y‖²] with ln σ ~ N(P_mean, P_std²) (EDM eq. 8 and Table 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lit_gen.diffusion.broadcast import append_dims, compute_dtype, expand_sigma
from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable

Net = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""A network ``net(x_in, c_noise, label) -> F``: ``c_noise`` has shape [B]; F has ``x_in``'s shape."""


class EDM(Configurable):
    """EDM preconditioning, noise-level distribution and loss weighting (Karras et al. 2022, Table 1).

    Args:
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        p_mean: mean of ln σ during training (P_mean).
        p_std: standard deviation of ln σ during training (P_std).
        sigma_min: smallest noise level used for sampling (σ_min of the Karras grid, EDM eq. 5).
        sigma_max: largest noise level used for sampling (σ_max of the Karras grid, EDM eq. 5).
    """

    kind = "edm"

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        if not sigma_data > 0:
            raise LitGenError(f"EDM sigma_data must be positive, got {sigma_data}")
        if not p_std > 0:
            raise LitGenError(f"EDM p_std must be positive, got {p_std}")
        if not 0 < sigma_min < sigma_max:
            raise LitGenError(f"EDM needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_data = float(sigma_data)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    # --- preconditioning, EDM Table 1 (element-wise: any shape of sigma works) ---
    def c_skip(self, sigma: Tensor) -> Tensor:
        """c_skip(σ) = σ_d² / (σ² + σ_d²) (EDM Table 1); → 1 as σ → 0, so D(x; 0) = x."""
        sd2 = self.sigma_data**2
        return sd2 / (sigma**2 + sd2)

    def c_out(self, sigma: Tensor) -> Tensor:
        """c_out(σ) = σ σ_d / √(σ² + σ_d²) (EDM Table 1); → 0 as σ → 0."""
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma: Tensor) -> Tensor:
        """c_in(σ) = 1 / √(σ² + σ_d²) (EDM Table 1): the network input has unit variance."""
        return torch.rsqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Tensor) -> Tensor:
        """c_noise(σ) = ln(σ) / 4 (EDM Table 1), the noise-level input of the network."""
        return torch.log(sigma) / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_d²) / (σ σ_d)² (EDM Table 1) = 1 / c_out(σ)²: the loss is a unit-weight MSE on F."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # --- denoiser and training ---
    def denoise(self, net: Net, x: Tensor, sigma: Tensor | float, label: Tensor | None = None) -> Tensor:
        """D(x; σ) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7). ``sigma``: [B] (or a scalar), σ > 0."""
        s = expand_sigma(sigma, x)
        sb = append_dims(s, x.ndim)
        x = x.to(s.dtype)
        f = net(self.c_in(sb) * x, self.c_noise(s), label)
        return self.c_skip(sb) * x + self.c_out(sb) * f.to(s.dtype)

    def sample_sigma(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels: ln σ ~ N(P_mean, P_std²) (EDM Table 1, "Noise distribution"). Shape [n]."""
        normal = torch.randn(n, device=device, generator=generator, dtype=dtype)
        return torch.exp(normal * self.p_std + self.p_mean)

    def loss(
        self, net: Net, y: Tensor, label: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sample λ(σ) ‖D(y + σ n; σ) − y‖², averaged over the non-batch dims (EDM eq. 8 / Table 1). Shape [B].

        σ is drawn first, then n, both with ``generator`` when given (reproducible).
        """
        dtype = compute_dtype(y)
        y = y.to(dtype)
        sigma = self.sample_sigma(y.shape[0], device=y.device, generator=generator, dtype=dtype)
        noise = torch.randn(y.shape, device=y.device, generator=generator, dtype=dtype)
        x = y + append_dims(sigma, y.ndim) * noise
        d = self.denoise(net, x, sigma, label)
        per_elem = append_dims(self.loss_weight(sigma), y.ndim) * (d - y) ** 2
        return per_elem.reshape(y.shape[0], -1).mean(dim=1)
