"""What every lit_gen training method shares: the data hand-over, shape checks, the self-describing checkpoint
section and the optimizer with linear warm-up.

A method subclasses :class:`GenerativeMethod`, keeps its trainable network in ``self.net`` and its parameterisation
(``lit_gen.diffusion.EDM`` / ``VP``) in ``self.param``, and implements ``training_step``. The checkpoint then carries
``checkpoint["lit_gen"]`` = {format, method, net spec, param spec, data info, sampling defaults}: loading it for
sampling needs only the file (see ``lit_gen.export``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lit_gen.diffusion import EDM, VP
from lit_gen.errors import LitGenError, first_line
from lit_gen.spec import describe

CHECKPOINT_FORMAT = 1


class GenerativeMethod(LightningModule):
    """Base LightningModule: owns ``net`` (trained), ``param`` (how the net becomes a denoiser) and ``data_info``.

    Args:
        net: the trainable network (``lit_gen.nets.UNet``, ``DiT``, ``MLPDenoiser``) given by ``class_path``.
        param: the diffusion parameterisation (``lit_gen.diffusion.EDM`` or ``VP``); None means ``EDM()``.
        optimizer: optimizer factory (``class_path: torch.optim.AdamW`` with ``init_args: {lr: ...}``).
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0 = none; EDM's lr ramp-up).
        decay_steps: if > 0, the learning rate decays linearly to 0 at this optimizer step (after the warm-up;
            progressive distillation's per-phase schedule); 0 keeps it constant (EDM).
    """

    method_name = "base"
    default_sampler: str = "heun"
    default_steps: int = 18
    supports_zero3: bool = True  # methods that copy parameters between networks set False

    def __init__(
        self,
        net: nn.Module,
        param: EDM | VP | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
    ) -> None:
        super().__init__()
        if warmup_steps < 0 or decay_steps < 0 or (decay_steps and decay_steps <= warmup_steps):
            raise LitGenError(
                f"need 0 <= warmup_steps < decay_steps (or decay_steps 0), got {warmup_steps}, {decay_steps}"
            )
        self.net = net
        self.param = param if param is not None else EDM()
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.data_info: dict[str, Any] | None = None
        self.save_hyperparameters(ignore=["net", "param", "optimizer"])

    # ----------------------------------------------------------------------------------------------- data hand-over
    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "init_args", {}).get("num_classes", 0) or 0)

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False) and not self.supports_zero3:
            raise LitGenError(
                f"the {self.method_name} method does not support DeepSpeed ZeRO stage 3 (its EMA / target / frozen "
                "copies of the network would read partitioned parameters); use deepspeed_stage2.yaml or ddp.yaml"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(datamodule, "info", None)
        if info is not None:
            self.attach_data(info)
        elif self.data_info is None:
            raise LitGenError("the training data has no dataset.json info; write shards with `lit-gen shards`")

    def attach_data(self, info: dict[str, Any]) -> None:
        """Record the data description (shape, classes, normalisation) and check the network accepts it."""
        if self.data_info is not None and list(self.data_info["shape"]) != list(info["shape"]):
            raise LitGenError(
                f"the checkpoint was trained on data of shape {self.data_info['shape']} but the shards have shape "
                f"{info['shape']}"
            )
        data_classes = int(info.get("num_classes", 0) or 0)
        if self.num_classes and data_classes and self.num_classes != data_classes:
            raise LitGenError(
                f"the network has num_classes={self.num_classes} but the shards have {data_classes} classes"
            )
        if self.num_classes and not data_classes:
            raise LitGenError(
                f"the network is class-conditional (num_classes={self.num_classes}) but the shards have no labels"
            )
        self.check_shape(list(info["shape"]))
        self.data_info = dict(info)

    def check_shape(self, shape: list[int]) -> None:
        """One forward pass on a zero sample: the network must take and return the data's shape."""
        x = torch.zeros(1, *shape, device=self.device)
        c_noise = torch.zeros(1, device=self.device)
        try:
            with torch.no_grad():
                out = self.net(x, c_noise, None)
        except Exception as err:  # noqa: BLE001 - any failure here means the shapes do not fit
            raise LitGenError(
                f"the network {type(self.net).__name__}({self.net.init_args}) cannot take data of shape {shape}: "
                f"{first_line(err)}"
            ) from None
        if tuple(out.shape) != tuple(x.shape):
            raise LitGenError(f"the network returns shape {list(out.shape[1:])} for data of shape {shape}")

    # ------------------------------------------------------------------------------------------------ optimisation
    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier after ``step`` optimizer steps: linear warm-up, then constant or linear decay."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.decay_steps > 0 and step >= self.warmup_steps:
            factor *= max(0.0, (self.decay_steps - step) / (self.decay_steps - self.warmup_steps))
        return factor

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.warmup_steps <= 0 and self.decay_steps <= 0:
            return optimizer
        # Schedules come from recipe numbers, never from trainer.estimated_stepping_batches (Lightning #20550).
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_parameters(self) -> Any:
        return self.net.parameters()

    # ----------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        """The self-describing part of a checkpoint: enough to rebuild the denoiser from the file alone."""
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.method_name,
            "net": describe(self.net),
            "param": describe(self.param),
            "data": self.data_info,
            "sampling": {"sampler": self.default_sampler, "steps": self.default_steps},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = self.describe()
        # Callbacks save first: callbacks.ema.EMA has put the averaged weights under checkpoint["ema_state_dict"].
        section["has_ema"] = "ema_state_dict" in checkpoint or bool(section.get("ema_prefix"))
        checkpoint["lit_gen"] = section

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        section = checkpoint.get("lit_gen")
        if section is None:
            raise LitGenError("this checkpoint was not written by lit_gen (it has no 'lit_gen' section)")
        if section.get("method") != self.method_name:
            raise LitGenError(
                f"the checkpoint is a '{section.get('method')}' checkpoint, not '{self.method_name}'; "
                "resume it with its own recipe"
            )
        if section.get("net") != describe(self.net):
            raise LitGenError(
                f"the checkpoint's network {section.get('net')} differs from the recipe's {describe(self.net)}"
            )
        if section.get("data") is not None:
            self.data_info = section["data"]
