"""EMA of the weights with a half-life in optimizer steps and EDM's ramp-up, on Lightning's ``WeightAveraging``.

Lightning's ``WeightAveraging`` already keeps the averaged copy, swaps it in for validation, and saves it as the
checkpoint's ``state_dict`` (raw weights go to ``current_model_state``) — so a checkpoint's ``state_dict`` holds the
EMA weights that sampling uses. Its own ``EMAWeightAveraging`` only has a fixed decay; EDM (Karras et al. 2022,
training loop) defines the decay by a half-life with a ramp-up early in training:
    halflife_k = min(halflife, k * rampup_ratio),  beta_k = 0.5 ** (1 / halflife_k)        (k = optimizer steps)
which is what this subclass adds (a half-life of H images at batch B is H / B steps).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging


def ema_beta(step: int, halflife_steps: float, rampup_ratio: float | None) -> float:
    """Decay of the k-th update (k counts from 1). EDM training loop: half-life ramps up as k·rampup_ratio."""
    halflife = halflife_steps if rampup_ratio is None else min(halflife_steps, step * rampup_ratio)
    return 0.5 ** (1.0 / max(halflife, 1e-8))


class EMA(WeightAveraging):
    """Exponential moving average of all weights (and buffers).

    Args:
        halflife_steps: EMA half-life in optimizer steps (EDM CIFAR-10: 500k images / batch 512 ≈ 977 steps).
        rampup_ratio: EDM's ramp-up: the half-life is at most ``step * rampup_ratio`` (None disables; EDM: 0.05).
        update_every_n_steps: update the average every N optimizer steps (the half-life still counts in steps).
        device: where the averaged copy lives; default = the training device.
    """

    def __init__(
        self,
        halflife_steps: float = 500.0,
        rampup_ratio: float | None = 0.05,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        self.halflife_steps = halflife_steps
        self.rampup_ratio = rampup_ratio
        self.update_every_n_steps = update_every_n_steps

        def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
            # The first update (num_averaged == 0) is a plain copy inside AveragedModel; this is update k >= 2,
            # covering update_every_n_steps optimizer steps.
            n = self.update_every_n_steps
            beta = ema_beta((int(num_averaged) + 1) * n, self.halflife_steps, self.rampup_ratio) ** n
            floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - beta)
            for a, c in zip(averaged, current, strict=True):
                if not a.is_floating_point():
                    a.copy_(c)

        super().__init__(device=device, use_buffers=True, multi_avg_fn=multi_avg_fn)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # WeightAveraging defaults to the module's device at setup time, which is still the CPU before the strategy
        # moves the model; keep the average on the training device instead.
        if self._device is None:
            self._device = trainer.strategy.root_device
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    @property
    def average_module(self) -> torch.nn.Module | None:
        """The averaged LightningModule copy (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module
