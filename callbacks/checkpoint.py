"""Lightning's ModelCheckpoint, plus ``last.ckpt`` at the final step.

With ``every_n_train_steps`` set, Lightning's ModelCheckpoint saves only at multiples of the interval, so a run whose
``max_steps`` is not a multiple ends without saving its last steps (measured: max_steps 650 with an interval of 100
left last.ckpt at step 600). This subclass also refreshes ``last.ckpt`` after the final optimizer step — still inside
``on_train_batch_end``, before the EMA callback copies the average into the model at ``on_train_end``, so the
checkpoint keeps both the raw and the averaged weights.

It also makes ``--ckpt_path last`` see the checkpoint Lightning writes on a SLURM preemption signal
(``hpc_ckpt_<n>.ckpt`` in the run folder): Lightning resolves "last" to the newest file among its checkpoint
callbacks' last checkpoints, which would otherwise ignore the HPC one and resume from an older ``last.ckpt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that also saves ``last.ckpt`` when ``max_steps`` is reached.

    ``enable_version_counter`` defaults to False: a run folder keeps exactly one ``last.ckpt`` (Lightning would write
    ``last-v1.ckpt`` beside a ``last.ckpt`` it did not write itself, e.g. after the run folder was copied or moved).
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if final and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        found = set(super()._find_last_checkpoints(trainer))
        root = Path(str(trainer.default_root_dir))
        if root.is_dir():
            found |= {str(p) for p in root.glob("hpc_ckpt_*.ckpt")}
        return found
