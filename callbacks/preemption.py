"""Preemption: SIGUSR1 / SIGTERM -> a checkpoint at the current step, then a clean exit saying how to resume.

The signal handler only sets a flag; the checkpoint is written at the next step boundary (``on_train_batch_end``,
after the optimizer step), with all ranks agreeing through one all-reduce of the flag, so the saved state is a
consistent one and the handler never does I/O itself. (Lightning's own SLURM handler saves inside the signal handler,
mid-step, and has been reported to hang there, Lightning #21406; this callback replaces it during fit.)

The checkpoint is ``<checkpoints>/last.ckpt`` through the run's ``Checkpoint`` callback (atomic), so
``--ckpt_path last`` resumes from it. Under SLURM (``SLURM_JOB_ID`` set, not an interactive step) the job is then
requeued with ``scontrol requeue`` — the sbatch file from ``lit-gen slurm`` asks for SIGUSR1 90 s before the limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

SIGNALS = ("SIGUSR1", "SIGTERM")
# What stopped the latest fit in this process ("SIGTERM at step 157"), or None: a fit that returns after a
# preemption signal is unfinished, and in-process callers (``lit-gen pipeline``) must not count it as done.
LAST_STOP: list[str] = []


class Preemption(Callback):
    """Checkpoint and stop on a preemption signal (and requeue under SLURM).

    Args:
        signals: signal names to handle (default SIGUSR1 and SIGTERM).
        requeue: under SLURM, requeue the job after the checkpoint (``scontrol requeue $SLURM_JOB_ID``).
    """

    def __init__(self, signals: list[str] | None = None, requeue: bool = True) -> None:
        self.signals = list(signals or SIGNALS)
        self.requeue = requeue
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after Lightning's own handlers (registered once fit has started): on SIGTERM Lightning would
        # raise SIGTERMException after the batch, and under SLURM save from inside the signal handler.
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            received = bool(trainer.strategy.reduce_boolean_decision(received, all=False))
        if not received:
            return
        path = None
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                path = os.path.join(dirpath, "last.ckpt")
                callback._save_checkpoint(trainer, path)  # type: ignore[attr-defined]
                break
        trainer.should_stop = True
        requeued = self.requeue and trainer.is_global_zero and _requeue_slurm()
        what = self.received or "a preemption signal (on another rank)"
        rank_zero_info(
            f"lit-gen: {what} at step {trainer.global_step}: "
            + (f"checkpoint saved to {path}; " if path else "no checkpoint callback, nothing saved; ")
            + ("job requeued" if requeued else "resume by running the same command with --ckpt_path last")
        )
        print(f"lit-gen: stopped by {what} at step {trainer.global_step}", file=sys.stderr)
        LAST_STOP.append(f"{what} at step {trainer.global_step}")


def _requeue_slurm() -> bool:
    """``scontrol requeue`` this SLURM job; False outside SLURM, in an interactive step, or with
    ``LIT_GEN_REQUEUE=0`` (set by ``lit-gen pipeline --jobs N`` for its fit processes: the pipeline requeues once,
    after every running stage has saved)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("LIT_GEN_REQUEUE") == "0":
        return False
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return False
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    target = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
    try:
        return subprocess.run(["scontrol", "requeue", target], check=False).returncode == 0
    except OSError:
        return False
