"""Sample grids during training: every N optimizer steps, sample from the EMA weights (the EMA callback's, or the
method's own EMA network named by ``describe()["ema_prefix"]``, as export does) with a fixed seed, save
``<default_root_dir>/samples/step_XXXXXXX.png`` and log the picture to TensorBoard."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.ema import EMA
from lit_gen.export import LoadedModel
from lit_gen.viz import samples_picture, save_png


class SampleGrid(Callback):
    """Save and log a grid of samples at a fixed interval.

    Args:
        every_n_steps: interval in optimizer steps; also samples once at the end of training when the run lasted
            at least one interval (so a smoke-test run of a few steps does not pay for a big grid).
        n: number of samples (images: the grid; points: the density picture).
        steps: sampler steps (None = the method's default).
        sampler: sampler name (None = the method's default).
        seed: seed of the noise, fixed so grids are comparable across steps.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        n: int = 64,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.n = n
        self.steps = steps
        self.sampler = sampler
        self.seed = seed
        self._last_step = -1

    def _averaged(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """The EMA weights: the method's own EMA network (TRACT's inference EMA, f-distill's generator EMA), or the
        EMA callback's weights swapped into ``pl_module.net`` while sampling; else the raw network."""
        prefix = pl_module.describe().get("ema_prefix") if hasattr(pl_module, "describe") else None
        if prefix:
            return contextlib.nullcontext(pl_module.get_submodule(prefix.rstrip(".")))
        for callback in trainer.callbacks:
            if isinstance(callback, EMA) and callback.target == "net":
                return callback.averaged(pl_module)
        return contextlib.nullcontext(pl_module.net)

    def _sample(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lit_gen.scale.fsdp import full_network, is_sharded

        step = trainer.global_step
        if step == self._last_step or getattr(pl_module, "data_info", None) is None:
            return
        self._last_step = step
        if not trainer.is_global_zero and not is_sharded(pl_module.net):
            return  # rank 0 samples; under FSDP every rank gathers the weights it samples with (full_network)
        with self._averaged(trainer, pl_module) as averaged, full_network(averaged) as net:
            if not trainer.is_global_zero:
                return
            was_training = net.training
            model = LoadedModel(net=net, param=pl_module.param, description=pl_module.describe())
            try:
                samples = model.sample(
                    self.n, steps=self.steps, sampler=self.sampler, seed=self.seed, device=pl_module.device
                )
            finally:
                net.train(was_training)
        picture = samples_picture(samples, pl_module.data_info["kind"])
        save_png(picture, Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples", torch.from_numpy(picture), step, dataformats="HWC")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step >= self.every_n_steps:
            self._sample(trainer, pl_module)
