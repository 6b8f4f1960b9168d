"""What every distillation method shares: the frozen teacher, read from a file, and a student started from it.

``--model.teacher PATH`` names a ``.ckpt`` written by ``lit-gen fit`` or a ``.safetensors`` file written by
``lit-gen export`` (read by ``lit_gen.export.load_model``: ``weights_only=True``, classes imported only from
``lit_gen.``, so loading never runs pickled code). The teacher's EMA weights are used when it kept an EMA.

- The parameterisation defaults to the teacher's; a recipe that names another one is refused (a VP student of an
  EDM teacher would silently learn the wrong targets).
- The student network defaults to the teacher's architecture, initialised from the teacher's weights, with dropout
  ``student_dropout`` (0 by default: ml-tract, progressive distillation "same as teacher but with 0 dropout",
  consistency_models ``--dropout 0.0 --teacher_dropout 0.1`` and DMD2 all train students without dropout;
  ALGORITHMS.md §7). Other trained copies of the teacher (f-distill's fake score) follow the same rule.
- The teacher network is frozen (``requires_grad_(False)``, eval mode — no dropout), is not handed to the optimizer
  (``trainable_parameters`` is the student's), and lives in the state dict under ``teacher_net.`` so a checkpoint is
  self-contained (TRACT replaces it at phase changes; resuming needs the current one).
- ``guidance`` != 1 distils the classifier-free guided teacher (Ho & Salimans 2022):
  x̂_g = x̂_c + (s − 1)(x̂_c − x̂_u), one batched call with the null class ``num_classes``.
- The teacher's data description (shape, classes, normalisation) must match the shards the student trains on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.data.info import check_compatible
from lit_gen.diffusion import EDM, VP, guide
from lit_gen.errors import LitGenError
from lit_gen.export import LoadedModel, load_model
from lit_gen.methods.base import GenerativeMethod
from lit_gen.spec import build, describe


def load_teacher(path: str | Path) -> LoadedModel:
    """The teacher model from ``path`` (a one-line ``LitGenError`` for a missing, unsafe or broken file)."""
    path = Path(path)
    if not path.exists():
        raise LitGenError(f"teacher {path} does not exist (pass --model.teacher PATH to a .ckpt or .safetensors)")
    try:
        return load_model(path, weights="ema")
    except LitGenError as err:
        message = str(err)
        raise LitGenError(message if str(path) in message else f"teacher {path}: {message}") from None


def _without_dropout(spec: dict[str, Any]) -> dict[str, Any]:
    """A network description minus its dropout rate (the student may drop the teacher's dropout: same weights)."""
    return {**spec, "init_args": {k: v for k, v in spec["init_args"].items() if k != "dropout"}}


def trainable_copy(net: nn.Module, dropout: float | None) -> nn.Module:
    """A trainable copy of ``net`` with the same weights and the dropout rate ``dropout`` (None = the same rate).

    The copy is rebuilt from ``net``'s self-description with ``dropout`` replaced, so its checkpoints record the rate
    it trains with; networks without a ``dropout`` argument are copied as they are.
    """
    spec = describe(net)
    if dropout is None or "dropout" not in spec["init_args"] or spec["init_args"]["dropout"] == dropout:
        copy_ = copy.deepcopy(net)
    else:
        copy_ = build({**spec, "init_args": {**spec["init_args"], "dropout": float(dropout)}})
        copy_.load_state_dict(net.state_dict())
    return copy_.requires_grad_(True).train()


class DistillationMethod(GenerativeMethod):
    """Base for students distilled from a frozen teacher (TRACT/BTD, consistency distillation, f-distill).

    Args:
        teacher: path to the teacher (``.ckpt`` from ``lit-gen fit`` or ``.safetensors`` from ``lit-gen export``).
        net: the student network; None = the teacher's architecture.
        param: the parameterisation; None = the teacher's (a different one is an error).
        guidance: classifier-free guidance scale of the teacher being distilled (1 = unguided).
        init_from_teacher: start the student from the teacher's weights (needs the same architecture; the dropout
            rate may differ).
        student_dropout: dropout rate of the student when it is the teacher's architecture (and of any other
            trained copy of the teacher, e.g. f-distill's fake score); 0 = none (the references' setting),
            None = the teacher's rate. Ignored when ``net`` is given (its own rate holds).
        optimizer: optimizer factory for the student.
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant).
    """

    method_name = "distill"
    # The students keep EMA / target / teacher copies of the network as plain modules; under ZeRO-3 their parameters
    # are partitioned placeholders, so those copies would silently read nothing (measured: TRACT's inference EMA
    # stayed at the teacher's weights). ZeRO 1/2 keep whole parameters on every rank and work.
    supports_zero3 = False

    def __init__(
        self,
        teacher: str,
        net: nn.Module | None = None,
        param: EDM | VP | None = None,
        guidance: float = 1.0,
        init_from_teacher: bool = True,
        student_dropout: float | None = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
    ) -> None:
        if student_dropout is not None and not 0.0 <= student_dropout < 1.0:
            raise LitGenError(f"student_dropout must be in [0, 1) or null, got {student_dropout}")
        loaded = load_teacher(teacher)
        if param is not None and describe(param) != describe(loaded.param):
            raise LitGenError(
                f"the teacher {teacher} uses {describe(loaded.param)} but the recipe asks for {describe(param)}; "
                "drop model.param to use the teacher's"
            )
        self.student_dropout = student_dropout
        # The loaded teacher comes frozen (eval, no grad); the student is trained.
        student = net.requires_grad_(True).train() if net is not None else trainable_copy(loaded.net, student_dropout)
        if init_from_teacher:
            if _without_dropout(describe(student)) != _without_dropout(describe(loaded.net)):
                raise LitGenError(
                    f"the student network {describe(student)} differs from the teacher's {describe(loaded.net)}; "
                    "use the teacher's architecture or set model.init_from_teacher false"
                )
            student.load_state_dict(loaded.net.state_dict())
        super().__init__(
            net=student,
            param=param if param is not None else loaded.param,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
        )
        self.teacher_path = str(teacher)
        self.teacher_description = {k: v for k, v in loaded.description.items() if k != "weights"}
        self.teacher_net = loaded.net.requires_grad_(False).eval()
        self.guidance = float(guidance)
        if self.guidance != 1.0 and self.teacher_num_classes == 0:
            raise LitGenError(f"guidance {self.guidance} needs a class-conditional teacher; {teacher} has no classes")
        self.data_info = loaded.data_info

    # ------------------------------------------------------------------------------------------------ the teacher
    @property
    def teacher_num_classes(self) -> int:
        return int(self.teacher_net.init_args.get("num_classes", 0) or 0)

    def train(self, mode: bool = True) -> DistillationMethod:
        """Lightning puts the module in train mode at fit start; the frozen teacher stays in eval mode."""
        super().train(mode)
        self.teacher_net.eval()
        return self

    @torch.no_grad()
    def teacher_denoise(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """The (guided) teacher's x̂(x; σ) in VE coordinates, without gradient."""
        if self.guidance == 1.0 or label is None:
            return self.param.denoise(self.teacher_net, x, sigma, label)
        null = torch.full_like(label, self.teacher_num_classes)
        both = self.param.denoise(
            self.teacher_net, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null])
        )
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, self.guidance)

    # ------------------------------------------------------------------------------------------------ data checks
    def attach_data(self, info: dict[str, Any]) -> None:
        teacher_info = self.teacher_description.get("data") or {}
        check_compatible(teacher_info, info, f"the teacher {self.teacher_path}")  # kind, and the VAE of latents
        if teacher_info and list(teacher_info.get("shape", [])) != list(info["shape"]):
            raise LitGenError(
                f"the teacher {self.teacher_path} was trained on data of shape {teacher_info['shape']} but the "
                f"shards have shape {info['shape']}"
            )
        teacher_classes = self.teacher_num_classes
        data_classes = int(info.get("num_classes", 0) or 0)
        if teacher_classes and data_classes and teacher_classes != data_classes:
            raise LitGenError(
                f"the teacher {self.teacher_path} has {teacher_classes} classes but the shards have {data_classes}"
            )
        self.data_info = None  # the shards' description wins (same shape), the student's checks run as usual
        super().attach_data(info)

    # ---------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        section = super().describe()
        section["teacher"] = {"path": self.teacher_path, "guidance": self.guidance}
        return section
