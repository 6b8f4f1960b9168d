"""Stop (or skip the batch) on a NaN/Inf loss or gradient, naming the step, the loss term and the network.

Checks, every optimizer step (all ranks agree through one all-reduce of a flag, so DDP never deadlocks):
- before the backward pass: the loss, and every scalar the method logged this step (``train/loss``,
  ``train/fake_score_loss``, ...) — the non-finite ones are the named loss terms;
- before the optimizer step: the gradients, grouped by the module's top-level networks (``net``, ``fake_score``,
  ...) — the networks holding non-finite gradients are named.

Policy ``"stop"`` (default): the weights are still the last good ones (the bad batch has not been applied), so a
checkpoint is written to ``<checkpoints>/last.ckpt`` (through the run's ``Checkpoint`` callback: atomic), and the run
stops with a ``LitGenError`` (``lit-gen: error: non-finite loss at step N ...``) saying how to resume.
Policy ``"skip"``: the batch's gradients are dropped (``grad = None``; torch optimizers then leave those parameters
and their moments untouched), the skip is counted in ``train/nonfinite_skipped`` and the run continues; more than
``max_skips`` skips stop it as above. Under DeepSpeed the engine owns the gradients: ``"skip"`` is refused there.

Lightning has no such check (``detect_anomaly`` is a debugging tool that slows every step); this callback is ours.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_gen.errors import LitGenError


class NonFiniteGuard(Callback):
    """Guard against NaN/Inf losses and gradients.

    Args:
        policy: "stop" (save the last good state and stop) or "skip" (drop the batch's update, count it).
        max_skips: with "skip", stop once more than this many batches were skipped.
        check_grads: also check gradients (one pass over them per optimizer step).
    """

    def __init__(self, policy: str = "stop", max_skips: int = 100, check_grads: bool = True) -> None:
        if policy not in ("stop", "skip"):
            raise LitGenError(f"NonFiniteGuard policy must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.max_skips = max_skips
        self.check_grads = check_grads
        self.skipped = 0
        self._skip_this_step = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.policy == "skip" and "deepspeed" in type(trainer.strategy).__name__.lower():
            raise LitGenError("NonFiniteGuard(policy='skip') does not work under DeepSpeed (it owns the gradients)")

    # --------------------------------------------------------------------------------------------------- checks
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad_local = not bool(torch.isfinite(loss.detach()).all())
        if not _any_rank(trainer, bad_local):
            return
        terms = _nonfinite_logged(trainer) or ["the total loss"]
        self._handle(trainer, pl_module, f"non-finite loss ({', '.join(terms)})")

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._skip_this_step:
            self._drop_gradients(pl_module)
            self._skip_this_step = False
            return
        if not self.check_grads:
            return
        bad = _nonfinite_grad_networks(pl_module)
        if not _any_rank(trainer, bool(bad)):
            return
        self._handle(trainer, pl_module, f"non-finite gradient in {', '.join(bad) or 'another rank'}")
        if self._skip_this_step:
            self._drop_gradients(pl_module)
            self._skip_this_step = False

    # --------------------------------------------------------------------------------------------------- actions
    def _handle(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        step = trainer.global_step
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            self._skip_this_step = True
            pl_module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=True)
            return
        path = _save_last_good(trainer)
        where = f"; the last good state (step {step}) is saved in {path}" if path else ""
        extra = f" after {self.skipped} skipped batches" if self.skipped else ""
        raise LitGenError(
            f"{what} at step {step}{extra}{where}; lower the learning rate or check the data, then resume with "
            "--ckpt_path last (or set NonFiniteGuard policy 'skip')"
        )

    @staticmethod
    def _drop_gradients(pl_module: LightningModule) -> None:
        for p in pl_module.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _any_rank(trainer: Trainer, flag: bool) -> bool:
    if trainer.world_size <= 1:
        return flag
    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))


def _nonfinite_logged(trainer: Trainer) -> list[str]:
    """Names of the scalars logged this step that are NaN/Inf (Lightning's result collection of the running loop)."""
    results = getattr(trainer, "_results", None)
    names = []
    for key, metric in (results or {}).items():
        value = getattr(metric, "value", None)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not math.isfinite(float(value)):
            names.append(str(key).split(".")[-1])
    return names


def _nonfinite_grad_networks(pl_module: LightningModule) -> list[str]:
    bad = []
    for name, child in pl_module.named_children():
        grads = [p.grad for p in child.parameters() if p.grad is not None]
        # One reduction (and one device sync) per network: a norm is non-finite iff some element is.
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            bad.append(name)
    return bad


def _save_last_good(trainer: Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            path = os.path.join(dirpath, "last.ckpt")
            callback._save_checkpoint(trainer, path)  # type: ignore[attr-defined]
            return path
    return None
