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
    ) -> None:
        super().__init__(net=net, param=param, optimizer=optimizer, warmup_steps=warmup_steps, decay_steps=decay_steps)
        if not 0.0 <= label_dropout < 1.0:
            raise LitGenError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout > 0 and self.num_classes == 0:
            raise LitGenError("label_dropout > 0 needs a class-conditional network (net num_classes > 0)")
        self.label_dropout = label_dropout

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
        loss = self.param.loss(self.net, y, label).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _held_out_loss(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        # A fixed generator per batch index makes the loss comparable between evaluations.
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        generator = torch.Generator(device=y.device).manual_seed(batch_idx)
        loss = self.param.loss(self.net, y, label, generator=generator).mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=y.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._held_out_loss(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._held_out_loss(batch, batch_idx, "test")

    def describe(self) -> dict[str, Any]:
        section = super().describe()
        section["label_dropout"] = self.label_dropout
        return section
