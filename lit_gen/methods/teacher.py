"""The teacher: denoising score matching with the EDM or VP parameterisation (ALGORITHMS.md §1).

Per step (EDM, Karras et al. 2022 §5 / eq. 2 and Table 1; VP, Salimans & Ho 2022):
    y ~ data, label dropped to the null class with probability ``label_dropout`` (classifier-free guidance,
    Ho & Salimans 2022), loss = ``param.loss(net, y, label)`` averaged over the batch.
The loss maths lives in ``lit_gen.diffusion`` (EDM.loss / VP.loss); this module only wires it to the data.
EMA of the weights is lit_gen's ``callbacks.ema.EMA`` callback, gradient clipping is the
Trainer's ``gradient_clip_val``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lit_gen.diffusion import EDM, VP
from lit_gen.diffusion.weighting import (
    WEIGHTINGS,
    AdaptiveLogSNR,
    build_schedule,
    build_weighting,
    describe_objective,
    native_objective,
    weighted_loss,
)
from lit_gen.errors import LitGenError
from lit_gen.methods.base import GenerativeMethod


class TeacherDiffusion(GenerativeMethod):
    """Diffusion teacher trained by denoising score matching.

    Args:
        net: the denoiser network F (``lit_gen.nets.UNet`` / ``DiT`` / ``MLPDenoiser``).
        param: ``lit_gen.diffusion.EDM`` (default) or ``lit_gen.diffusion.VP`` (ε/x/v prediction, cosine schedule).
        optimizer: optimizer factory, e.g. ``torch.optim.AdamW`` with ``lr``.
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant after the warm-up, as EDM).
        label_dropout: probability of replacing a label by the null class (classifier-free guidance training;
            0.1-0.2 is usual). Needs a class-conditional network.
        weighting: the loss weighting w(λ) over log-SNR λ (Kingma & Gao 2023; ``lit_gen.diffusion.weighting``):
            elbo, eps, v, snr_trunc, edm or sigmoid. None (default) with ``noise_schedule`` None keeps the
            parameterisation's own loss (``EDM.loss`` / ``VP.loss``) unchanged.
        weighting_bias: b of the ``sigmoid`` weighting w(λ) = sigmoid(b − λ); larger b weights low noise more.
        noise_schedule: the distribution p(λ) of training noise levels: edm (log-normal σ), cosine (uniform t),
            uniform (uniform λ) or adaptive (p(λ) tracking the loss per λ bin). None: the parameterisation's own
            (EDM: edm, VP: cosine).
        adaptive_bins: number of λ bins of the ``adaptive`` noise schedule.
        adaptive_momentum: EMA momentum of the ``adaptive`` noise schedule's per-bin statistic.
    """

    method_name = "teacher"

    def __init__(
        self,
        net: nn.Module,
        param: EDM | VP | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        label_dropout: float = 0.0,
        weighting: str | None = None,
        weighting_bias: float = 0.0,
        noise_schedule: str | None = None,
        adaptive_bins: int = 32,
        adaptive_momentum: float = 0.99,
    ) -> None:
        super().__init__(net=net, param=param, optimizer=optimizer, warmup_steps=warmup_steps, decay_steps=decay_steps)
        if not 0.0 <= label_dropout < 1.0:
            raise LitGenError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout > 0 and self.num_classes == 0:
            raise LitGenError("label_dropout > 0 needs a class-conditional network (net num_classes > 0)")
        self.label_dropout = label_dropout
        if weighting is not None and weighting not in WEIGHTINGS:
            raise LitGenError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.weighting = None
        self.noise_schedule = None
        if weighting is not None or noise_schedule is not None:
            own_weighting, own_schedule = native_objective(self.param)
            self.weighting = build_weighting(weighting or own_weighting, self.param, weighting_bias)
            # An nn.Module schedule (adaptive) is a submodule: its buffers are saved with the checkpoint.
            self.noise_schedule = build_schedule(
                noise_schedule or own_schedule, self.param, bins=adaptive_bins, momentum=adaptive_momentum
            )

    def loss(
        self, y: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-sample loss: the parameterisation's own, or the weighted loss of ``weighting``/``noise_schedule``."""
        if self.weighting is None:
            return self.param.loss(self.net, y, label, generator=generator)
        loss, lam, integrand = weighted_loss(
            self.param, self.net, y, label, self.weighting, self.noise_schedule, generator=generator
        )
        if self.training and isinstance(self.noise_schedule, AdaptiveLogSNR):
            self.noise_schedule.update(lam, integrand)
        return loss

    def labels_for_training(self, label: torch.Tensor | None) -> torch.Tensor | None:
        """Class labels with CFG dropout to the null class ``num_classes``; None for unconditional nets."""
        if self.num_classes == 0 or label is None:
            return None
        if self.label_dropout > 0:
            drop = torch.rand(label.shape, device=label.device) < self.label_dropout
            label = torch.where(drop, torch.full_like(label, self.num_classes), label)
        return label

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        y = batch["x"]
        label = self.labels_for_training(batch.get("label"))
        loss = self.loss(y, label).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _held_out_loss(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        # A fixed generator per batch index makes the loss comparable between evaluations.
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        generator = torch.Generator(device=y.device).manual_seed(batch_idx)
        loss = self.loss(y, label, generator=generator).mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=y.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._held_out_loss(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._held_out_loss(batch, batch_idx, "test")

    def describe(self) -> dict[str, Any]:
        section = super().describe()
        section["label_dropout"] = self.label_dropout
        if self.weighting is not None:
            section["objective"] = describe_objective(self.weighting, self.noise_schedule)
        return section
