"""Compile the networks of a method with ``torch.compile`` and/or switch them to channels-last memory format.

    lit-gen fit -c RECIPE --trainer.callbacks+=callbacks.compile.Compile \\
        [--trainer.callbacks.channels_last true] [--trainer.callbacks.mode max-autotune]

Networks are compiled in place (``nn.Module.compile``, PyTorch >= 2.2), so parameter names, state dicts,
checkpoints, EMA copies and exported files are exactly those of an uncompiled run: the callback changes speed, never
results beyond floating-point rounding (the fused kernels may round differently). Only the networks in the training
step's hot path are compiled (the student ``net``, a frozen ``teacher_net``, f-distill's ``fake_net``, CD's
``target_net``, TRACT's ``self_teacher``); EMA copies are used for sampling only and stay eager.

Networks of one class share one compiled code object, and each instance (dropout rate), grad mode (the frozen
teacher runs under ``no_grad``) and batch size (CFG doubles it) is a separate graph: a distillation step can need
more than Dynamo's default 8 graphs per function, after which it silently falls back to eager. The callback raises
``torch._dynamo.config.recompile_limit`` to 16 per network it compiles.

Channels-last (``torch.channels_last``) stores 4-D convolution weights as NHWC, which cuDNN's tensor-core kernels
prefer at bf16 (PyTorch's "(beta) Channels Last Memory Format" tutorial); a convolution whose weight is channels-last
produces a channels-last output, so the whole U-Net runs in that layout. Networks without 4-D weights (the MLP, DiT's
linear layers) are unchanged. Checkpoints are unaffected (``state_dict`` tensors are saved by value).

Why a callback and not a recipe key of every method: it applies to every method the same way, is opt-in per run
(an overlay line), and keeps the methods free of engine concerns (DESIGN.md "Scale").
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lit_gen.errors import LitGenError

HOT_PATH = ("net", "teacher_net", "fake_net", "target_net", "self_teacher")


class Compile(Callback):
    """``torch.compile`` (in place) and/or channels-last for the networks of the training step.

    Args:
        compile: Compile the networks (False: channels-last only).
        mode: ``torch.compile`` mode (None = default; "reduce-overhead", "max-autotune", ...).
        backend: ``torch.compile`` backend ("inductor"; "eager" traces with Dynamo but runs eager kernels: a cheap
            check that a network compiles, used by the CPU benchmark).
        channels_last: Store 4-D weights channels-last (NHWC).
        dynamic: ``torch.compile``'s ``dynamic`` (None lets PyTorch decide).
        modules: Names of the LightningModule's attributes to treat (missing or None ones are skipped).
    """

    def __init__(
        self,
        compile: bool = True,
        mode: str | None = None,
        backend: str = "inductor",
        channels_last: bool = False,
        dynamic: bool | None = None,
        modules: list[str] | tuple[str, ...] = HOT_PATH,
    ) -> None:
        if not compile and not channels_last:
            raise LitGenError("callbacks.compile.Compile with compile=false and channels_last=false does nothing")
        self.compile, self.mode, self.backend = compile, mode, backend
        self.channels_last, self.dynamic, self.modules = channels_last, dynamic, tuple(modules)
        self.treated: list[str] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After setup (the teacher is loaded, EMA copies exist) and after the strategy moved the module to its device.
        found = [(name, getattr(pl_module, name, None)) for name in self.modules]
        nets = [(name, m) for name, m in found if isinstance(m, nn.Module)]
        if not nets:
            raise LitGenError(
                f"callbacks.compile.Compile found none of the networks {list(self.modules)} on "
                f"{type(pl_module).__name__}"
            )
        if self.compile:
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 16 * len(nets))
        for name, module in nets:
            if self.channels_last:
                to_channels_last(module)
            if self.compile:
                module.compile(mode=self.mode, backend=self.backend, dynamic=self.dynamic)
            self.treated.append(name)

    def state_dict(self) -> dict[str, Any]:
        return {}


def to_channels_last(module: nn.Module) -> nn.Module:
    """Make every 4-D parameter and buffer of ``module`` channels-last in place (values unchanged)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module
