"""Lightning's ModelCheckpoint, plus ``last.ckpt`` at the final step.

With ``every_n_train_steps`` set, Lightning's ModelCheckpoint saves only at multiples of the interval, so a run whose
``max_steps`` is not a multiple ends without saving its last steps (measured: max_steps 650 with an interval of 100
left last.ckpt at step 600). This subclass also refreshes ``last.ckpt`` after the final optimizer step — still inside
``on_train_batch_end``, before the EMA callback copies the average into the model at ``on_train_end``, so the
checkpoint keeps both the raw and the averaged weights.

It also makes ``--ckpt_path last`` see the checkpoint Lightning writes on a SLURM preemption signal
(``hpc_ckpt_<n>.ckpt`` in the run folder): Lightning resolves "last" to the newest file among its checkpoint
callbacks' last checkpoints, which would otherwise ignore the HPC one and resume from an older ``last.ckpt``.

Checkpoints are committed atomically: Lightning writes ``NAME.partial`` (a file, or a folder under DeepSpeed), which
is fsync'ed and then renamed to ``NAME`` — so a kill at any moment leaves either the previous complete checkpoint or
the new one under ``NAME``, never a torn file. (Lightning's own local save goes through fsspec, which writes a temp
file in the system temp folder and *moves* it: across filesystems that is a copy, which a kill can tear.) A folder
checkpoint is swapped by two renames (``NAME`` -> ``NAME.old``, ``.partial`` -> ``NAME``); a kill between them is
repaired when "last" is looked up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from weakref import proxy

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

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        if trainer.is_global_zero:
            _remove(partial)  # left over from a killed save
        trainer.strategy.barrier("lit_gen_checkpoint_clean")
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier("lit_gen_checkpoint_written")
        if trainer.is_global_zero:
            commit(partial, filepath)
        trainer.strategy.barrier("lit_gen_checkpoint_committed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for old in Path(self.dirpath).glob("*.ckpt.old"):
                target = old.with_suffix("")
                if not target.exists():  # killed between the two renames of a folder checkpoint
                    os.replace(old, target)
        found = set(super()._find_last_checkpoints(trainer))
        root = Path(str(trainer.default_root_dir))
        if root.is_dir():
            found |= {str(p) for p in root.glob("hpc_ckpt_*.ckpt")}
        return found


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(partial: str | Path, final: str | Path) -> None:
    """Make the fully written ``partial`` (file or folder) the checkpoint ``final``: fsync, then rename."""
    partial, final = Path(partial), Path(final)
    _fsync_tree(partial)
    if partial.is_dir() and final.exists():
        old = final.with_name(final.name + ".old")
        _remove(old)
        os.replace(final, old)
        os.replace(partial, final)
        _remove(old)
    else:
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(partial, final)
    _fsync_dir(final.parent)
