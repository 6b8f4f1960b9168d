"""Guidance: classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024).

Guidance is an affine combination of two predictions, so it gives the same x̂ whether it is applied to x̂, ε̂ or v̂
(the maps between them are affine in the prediction for fixed z, α, σ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_gen.diffusion.broadcast import append_dims, expand_sigma
from lit_gen.diffusion.samplers import Denoiser
from lit_gen.errors import LitGenError


def guide(pred_cond: Tensor, pred_uncond: Tensor, scale: float | Tensor) -> Tensor:
    """pred_u + s (pred_c − pred_u) = pred_c + (s − 1)(pred_c − pred_u) (Ho & Salimans 2022, eq. 6 with w = s − 1).

    s = 1 returns ``pred_cond`` itself; s = 0 the unconditional prediction. ``scale`` may be a [B] tensor: one weight
    per sample (a w-conditioned student's targets, Meng et al. 2023), broadcast over the other dimensions. The same
    formula with a bad model's prediction as ``pred_uncond`` is autoguidance (Karras et al. 2024, eq. 1).
    """
    if isinstance(scale, Tensor):
        s = append_dims(scale.reshape(-1).to(pred_cond.dtype), pred_cond.ndim)
        return pred_uncond + s * (pred_cond - pred_uncond)
    if scale == 1:
        return pred_cond
    return pred_uncond + scale * (pred_cond - pred_uncond)


class CFGDenoiser:
    """Classifier-free guided denoiser (Ho & Salimans 2022): x̂_u + s (x̂_c − x̂_u).

    The conditional and the unconditional (``null_label``) predictions come from ONE batched call on the
    concatenated batch [x; x] with labels [label; null]. ``scale == 1`` makes a single conditional call.

    Args:
        denoiser: ``D(x, sigma, label)`` of a model trained with label dropout to ``null_label``.
        scale: guidance scale s (1 = no guidance).
        null_label: the class index that stands for "no label".
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_label = int(null_label)

    def __call__(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        if label is None:
            raise LitGenError(
                "classifier-free guidance needs class labels (pass --label); "
                "for an unconditional model use autoguidance instead"
            )
        if self.scale == 1:
            return self.denoiser(x, sigma, label)
        s = expand_sigma(sigma, x)
        label = label.reshape(-1).expand(x.shape[0]) if label.numel() == 1 else label
        labels = torch.cat([label, torch.full_like(label, self.null_label)])
        out = self.denoiser(torch.cat([x, x]), torch.cat([s, s]), labels)
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, self.scale)


class AutoGuidanceDenoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
    x̂_bad + s (x̂_good − x̂_bad), the "bad" model being a smaller or less-trained version of the good one.

    Works for unconditional models too (labels pass through to both). With good ≡ bad it returns that prediction.
    """

    def __init__(self, good: Denoiser, bad: Denoiser, scale: float) -> None:
        self.good = good
        self.bad = bad
        self.scale = float(scale)

    def __call__(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        pred_good = self.good(x, sigma, label)
        if self.scale == 1 or self.bad is self.good:
            return pred_good
        return guide(pred_good, self.bad(x, sigma, label), self.scale)


class GuidanceBound:
    """``net`` with its guidance input fixed to ``w`` (a [B] tensor; None = no guidance input), callable as the
    plain net contract ``net(x_in, c_noise, label)`` that every parameterisation's ``denoise`` calls; also binds
    ``features`` / ``feature_levels`` for the discriminator heads."""

    def __init__(self, net: nn.Module, w: Tensor | None) -> None:
        self.net = net
        self.w = w

    def _kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        return kw if self.w is None else {**kw, "c_guide": self.w}

    def __call__(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None = None, **kw: Any) -> Tensor:
        return self.net(x_in, c_noise, label, **self._kw(kw))

    def features(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None = None, **kw: Any) -> Tensor:
        return self.net.features(x_in, c_noise, label, **self._kw(kw))

    def feature_levels(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None = None, **kw: Any) -> list[Tensor]:
        return self.net.feature_levels(x_in, c_noise, label, **self._kw(kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)


def bind_guidance(net: nn.Module, w: Tensor | None) -> Any:
    """``net`` itself when ``w`` is None, else ``GuidanceBound(net, w)``."""
    return net if w is None else GuidanceBound(net, w)
