"""EMA of the trained network's weights with a half-life in optimizer steps and EDM's ramp-up.

EDM (Karras et al. 2022, training loop) defines the decay by a half-life with a ramp-up early in training:
    halflife_k = min(halflife, k * rampup_ratio),  beta_k = 0.5 ** (1 / halflife_k)        (k = optimizer steps)
(a half-life of H images at batch B is H / B steps).

Why not Lightning's ``WeightAveraging``: it deep-copies the whole LightningModule — a distillation module's frozen
teacher, fake-score network and discriminator too — and cannot copy a module set up by DeepSpeed (measured: "cannot
pickle '_thread.lock'"), and under DeepSpeed its swap of ``checkpoint["state_dict"]`` is dropped (the engine saves the
module itself). This callback averages only ``pl_module.<target>`` (default ``net``), keeps the average in float32
whatever the training precision, gathers ZeRO-3 partitioned parameters to read them, and stores the average in the
checkpoint under ``checkpoint["ema_state_dict"]`` (keys ``net.*``, like the module's ``state_dict``) — a top-level key,
so DeepSpeed keeps it in its client state. ``checkpoint["state_dict"]`` stays the raw weights.
Validation runs on the averaged weights (swapped in and back); ``averaged(pl_module)`` does the same for samplers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

EMA_KEY = "ema_state_dict"


def ema_beta(step: int, halflife_steps: float, rampup_ratio: float | None) -> float:
    """Decay of the k-th update (k counts from 1). EDM training loop: half-life ramps up as k·rampup_ratio."""
    halflife = halflife_steps if rampup_ratio is None else min(halflife_steps, step * rampup_ratio)
    return 0.5 ** (1.0 / max(halflife, 1e-8))


@contextlib.contextmanager
def _gathered(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Full values of ZeRO-3 partitioned parameters (read-only); a no-op for ordinary tensors."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


class EMA(Callback):
    """Exponential moving average of the trained network (parameters and floating-point buffers).

    Args:
        halflife_steps: EMA half-life in optimizer steps (EDM CIFAR-10: 500k images / batch 512 ≈ 977 steps).
        rampup_ratio: EDM's ramp-up: the half-life is at most ``step * rampup_ratio`` (None disables; EDM: 0.05).
        update_every_n_steps: update the average every N optimizer steps (the half-life still counts in steps).
        device: where the average lives; default = the training device ("cpu" saves accelerator memory).
        target: the LightningModule attribute holding the network to average.
    """

    def __init__(
        self,
        halflife_steps: float = 500.0,
        rampup_ratio: float | None = 0.05,
        update_every_n_steps: int = 1,
        device: str | None = None,
        target: str = "net",
    ) -> None:
        self.halflife_steps = halflife_steps
        self.rampup_ratio = rampup_ratio
        self.update_every_n_steps = update_every_n_steps
        self.device = device
        self.target = target
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None
        self._last_step = -1
        self._backup: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------- averaging
    def _tensors(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        net = getattr(pl_module, self.target)
        named = dict(net.named_parameters())
        named.update({k: b for k, b in net.named_buffers() if b.is_floating_point()})
        return named

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.update_every_n_steps:
            return  # no optimizer step this batch (accumulation), or not an update step
        self._last_step = step
        current = self._tensors(pl_module)
        with torch.no_grad(), _gathered(list(current.values())):
            device = torch.device(self.device) if self.device else None
            if self.shadow is None or self.num_updates == 0:
                # The first update copies the weights (the bias-corrected start of the average).
                self.shadow = {k: v.detach().to(device=device or v.device, dtype=torch.float32, copy=True)
                               for k, v in current.items()}  # fmt: skip
            else:
                n = self.update_every_n_steps
                beta = ema_beta((self.num_updates + 1) * n, self.halflife_steps, self.rampup_ratio) ** n
                keys = list(self.shadow)
                averaged = [self.shadow[k] for k in keys]
                values = [current[k].detach().to(averaged[i].device, torch.float32) for i, k in enumerate(keys)]
                torch._foreach_lerp_(averaged, values, 1.0 - beta)
        self.num_updates += 1

    @contextlib.contextmanager
    def averaged(self, pl_module: LightningModule) -> Iterator[torch.nn.Module]:
        """The target network with the averaged weights swapped in for the duration (raw ones restored after)."""
        net = getattr(pl_module, self.target)
        if self.shadow is None:
            yield net
            return
        current = self._tensors(pl_module)
        if any(hasattr(t, "ds_id") for t in current.values()):
            yield net  # ZeRO-3: the partitioned module cannot take full tensors in place; use the raw weights
            return
        backup = {k: v.detach().clone() for k, v in current.items()}
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(self.shadow[k].to(v.device, v.dtype))
        try:
            yield net
        finally:
            with torch.no_grad():
                for k, v in current.items():
                    v.copy_(backup[k])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.shadow is None:
            return
        self._swap = self.averaged(pl_module)
        self._swap.__enter__()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        swap = getattr(self, "_swap", None)
        if swap is not None:
            self._swap = None
            swap.__exit__(None, None, None)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.shadow is not None:
            checkpoint[EMA_KEY] = {f"{self.target}.{k}": v.detach().cpu().clone() for k, v in self.shadow.items()}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(EMA_KEY)
        if saved:
            prefix = f"{self.target}."
            self.shadow = {k[len(prefix) :]: v.float() for k, v in saved.items() if k.startswith(prefix)}
            device = self.device or pl_module.device
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._last_step = int(state_dict.get("last_step", -1))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow is not None:  # restored from a checkpoint before the model moved to its device
            device = torch.device(self.device) if self.device else pl_module.device
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
