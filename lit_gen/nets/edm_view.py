"""A denoiser of any lit_gen parameterisation seen through EDM's preconditioning (Karras et al. 2022, eq. 7).

``EDMView`` wraps a network ``inner`` and its parameterisation ``inner_param`` (e.g. an imported diffusers model and
its ``DiscreteVP`` table) and is itself a network F for ``diffusion.EDM``: with σ = exp(4 c_noise) and
x = x_in / c_in(σ) (EDM Table 1), F(x_in, c_noise) = (D_inner(x; σ) − c_skip(σ) x) / c_out(σ), so that
EDM's D(x; σ) = c_skip x + c_out F = D_inner(x; σ). Methods that need EDM coordinates and F (consistency
distillation: CM eq. 27 reuses EDM's c_in/c_noise and F) then run on a teacher trained with another schedule,
and a student initialised from it starts as that teacher's denoiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_gen.errors import LitGenError
from lit_gen.spec import Configurable, build


class _Capture(nn.Module):
    """Records the (x_in, c_noise, label) a parameterisation hands to its network; returns zeros."""

    def forward(self, x: Tensor, c_noise: Tensor, label: Tensor | None = None) -> Tensor:
        self.args = (x, c_noise, label)
        return torch.zeros_like(x)


class EDMView(Configurable, nn.Module):
    """EDM's F for the denoiser ``inner_param.denoise(inner, ·)``.

    Args:
        net: the inner network's spec (``{"class_path", "init_args"}``; lit_gen classes only).
        param: the inner parameterisation's spec.
        sigma_data: σ_d of the EDM preconditioning this view is read with (must equal the EDM param's).
        num_classes: the inner network's number of classes (recorded for lit_gen's class-conditional code).
    """

    def __init__(self, net: dict[str, Any], param: dict[str, Any], sigma_data: float = 0.5, num_classes: int = 0):
        super().__init__()
        from lit_gen.diffusion.edm import EDM

        self.inner = build(net)
        self.inner_param = build(param)
        self.edm = EDM(sigma_data=sigma_data)
        inner_classes = int(getattr(self.inner, "init_args", {}).get("num_classes", 0) or 0)
        if inner_classes != num_classes:
            raise LitGenError(f"EDMView num_classes={num_classes} but its inner network has {inner_classes}")
        self.num_classes = num_classes
        self.feature_dim = getattr(self.inner, "feature_dim", None)

    def _state(self, x_in: Tensor, c_noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x, σ) from EDM's network inputs: σ = exp(4 c_noise), x = x_in / c_in(σ)."""
        sigma = torch.exp(4 * c_noise.to(torch.promote_types(x_in.dtype, torch.float32)).reshape(-1))
        if sigma.numel() == 1:
            sigma = sigma.expand(x_in.shape[0])
        c_in = self.edm.c_in(sigma).reshape(-1, *([1] * (x_in.ndim - 1)))
        return x_in.to(sigma.dtype) / c_in, sigma

    def forward(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None = None) -> Tensor:
        """F = (D_inner(x; σ) − c_skip(σ) x) / c_out(σ) (EDM eq. 7 solved for F)."""
        x, sigma = self._state(x_in, c_noise)
        sb = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        d = self.inner_param.denoise(self.inner, x, sigma, label)
        return (d - self.edm.c_skip(sb) * x) / self.edm.c_out(sb)

    def features(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None = None) -> Tensor:
        """The inner network's features at the inputs its own parameterisation gives it."""
        if not hasattr(self.inner, "features"):
            raise LitGenError(f"the network {type(self.inner).__name__} has no features() for a head")
        x, sigma = self._state(x_in, c_noise)
        capture = _Capture()
        self.inner_param.denoise(capture, x, sigma, label)
        return self.inner.features(*capture.args)
