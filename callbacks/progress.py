"""Honest progress for step-based training: one bar over the whole run (optimizer step / ``max_steps``, no epoch
counts — lit_gen's epochs are only passes of the data stream and ``max_epochs`` is -1), the loss, samples/s and the
time left; the same throughput in TensorBoard (``train/device/samples_per_sec``, and ``train/samples_per_sec`` over
all devices when there are several) through Lightning's ``ThroughputMonitor``.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.throughput import Throughput as FabricThroughput
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only


def batch_samples(batch: Any) -> int:
    """Samples in a lit_gen batch ``{"x": [B, ...], "label": [B]}`` (images or points)."""
    if isinstance(batch, dict) and "x" in batch:
        return int(batch["x"].shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_samples(batch[0])
    return int(batch.shape[0])


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` over lit_gen batches: logs ``train/device/samples_per_sec`` (and
    ``train/samples_per_sec``, all devices, when there are several) every ``log_every_n_steps`` and keeps the
    newest value for the progress bar.

    Args:
        window_size: batches in the rolling average (Lightning's default is 100; short CPU runs want fewer).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=batch_samples, window_size=max(int(window_size), 2))
        self.samples_per_sec: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # FLOPs (and MFU) are only measured for modules that define flops_per_batch; none of lit_gen's do, so skip
        # Lightning's chip table (it warns "FLOPs not found for ..." on chips it does not list) and its warning.
        self._module_has_flops = hasattr(pl_module, "flops_per_batch")
        if self._module_has_flops:
            return super().setup(trainer, pl_module, stage)
        self.available_flops = None
        stages = [trainer.state.stage]
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            stages.append(RunningStage.VALIDATING)
        for running in stages:
            self._throughputs[running] = FabricThroughput(world_size=trainer.world_size, **self.kwargs)

    @rank_zero_only  # as Lightning's own hook: the other ranks record nothing
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *a) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *a)
        throughput = self._throughputs.get(trainer.state.stage) if trainer.state.stage else None
        if throughput is not None and throughput._time:
            metrics = throughput.compute()  # "samples_per_sec" (all devices) only exists when world_size > 1
            device = metrics.get(f"device{throughput.separator}samples_per_sec")
            value = metrics.get("samples_per_sec", None if device is None else device * trainer.world_size)
            if value is not None:
                self.samples_per_sec = float(value)


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose training task counts optimizer steps up to ``max_steps`` (falls back to Lightning's
    per-epoch bar when the run is bounded by epochs); shows the prog-bar metrics and samples/s, not the logger
    version. Rich's time column reads "elapsed • time left" over the whole run."""

    def _steps_bound(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if self._steps_bound():
            return f"{'step':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)

    def _start_steps_task(self, trainer: Trainer) -> None:
        assert self.progress is not None
        description = self._get_train_description(trainer.current_epoch)
        # Started at the step already taken (a resumed run), so rich's speed and time left count only this launch.
        self.train_progress_bar_id = self.progress.add_task(
            f"[{self.theme.description}]{description}" if self.theme.description else description,
            total=trainer.max_steps,
            completed=trainer.global_step,
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._steps_bound():
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is None:
            self._start_steps_task(trainer)
        self.refresh()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int):
        if not self._steps_bound():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        if not self.is_disabled and self.train_progress_bar_id is None and self.progress is not None:
            self._start_steps_task(trainer)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = dict(trainer.progress_bar_metrics)
        for callback in trainer.callbacks:
            if isinstance(callback, Throughput) and callback.samples_per_sec is not None:
                metrics["samples/s"] = f"{callback.samples_per_sec:.0f}"
        return metrics
