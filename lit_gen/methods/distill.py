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
- ``guidance: [w_min, w_max]`` distils a **w-conditioned** student (Meng et al. 2023, "On Distillation of Guided
  Diffusion Models", Sec. 4.1; LCM): w ~ U[w_min, w_max] per sample, the teacher's target guided at that sample's w,
  and the student takes w through a zero-initialised embedding (``guidance_embed`` of the nets,
  ``lit_gen.nets.embed.GuidanceEmbedding``), so it starts as the unguided teacher copy at every w. The range is
  recorded in the checkpoint (``guidance_range``); ``lit-gen sample --guidance w`` feeds w to the student.
- ``guidance_stage_one N`` (TRACT/BTD and CD): the first N optimizer steps are Meng et al.'s stage one (Sec. 4.1,
  eq. 6): the student regresses onto the guided teacher's x̂ at the same noisy input, w(σ)·‖x̂_θ(x_σ; σ, w) −
  x̂^w_teacher(x_σ; σ)‖², σ from the teacher's training distribution, w per sample. A w-conditioned student has to
  learn w before a bootstrapped target can carry it: TRACT's self-teacher, BTD's later-phase teachers and CD's
  target network are the student itself, so without stage one the w signal enters only through the single guided
  teacher hop of each target and the w embedding barely moves (benchmarks/RESULTS.md, issue 18).
- ``guide_teacher PATH`` replaces the unconditional branch by a guiding model (autoguidance, Karras et al. 2024,
  "Guiding a Diffusion Model with a Bad Version of Itself", eq. 1): D_w = D_bad + w (D − D_bad), D_bad a smaller or
  shorter-trained teacher of the same data and classes. A teacher file exported with ``--guide`` carries its
  guiding model and is used the same way without ``guide_teacher``. Works with a fixed w and with a w range.
- The teacher's data description (shape, classes, normalisation) must match the shards the student trains on.
- Under DeepSpeed ZeRO-3 (issue 20) ``teacher_zero3`` chooses where the frozen teacher (and guiding model) live:
  ``partition`` (default) leaves them in the engine's module, so ZeRO-3 partitions them like the student and gathers
  one layer at a time for each teacher call: per rank P_T·b/N bytes at rest (P_T teacher parameters, b bytes per
  element of the compute dtype, N ranks) plus one layer gathered while it runs, at the price of an all-gather of the
  whole teacher on every teacher call; ``replicate`` keeps a full copy on every rank outside the engine's
  partitioning, in the compute dtype (bf16 under ``bf16-mixed``): P_T·b bytes per rank and no communication for
  teacher calls. The teacher is frozen either way (no gradient, no optimizer state). A replicated teacher is saved
  in rank 0's client state (``replicated_state_dict``: TRACT's teacher changes at phase changes) and broadcast to the
  other ranks on resume. EMA, target and self-teacher copies stay in the engine and are updated through
  ``lit_gen.scale.zero3.gathered_copy``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.data.info import check_compatible
from lit_gen.diffusion import EDM, VP, guide
from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.diffusion.tract import x_loss_weight
from lit_gen.errors import LitGenError
from lit_gen.export import LoadedModel, load_model
from lit_gen.methods.base import GenerativeMethod
from lit_gen.nets.lora import check_resume
from lit_gen.scale.checkpoints import REPLICATED_KEY  # networks kept outside ZeRO-3's partitioning
from lit_gen.spec import build, describe

TEACHER_ZERO3 = ("partition", "replicate")  # where the frozen teacher lives under ZeRO-3 (see the module docstring)


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
    """A network description minus its dropout rate and guidance input (the student may drop the teacher's dropout
    and add a zero-initialised w embedding: the teacher's weights still fit)."""
    drop = ("dropout", "guidance_embed")
    return {**spec, "init_args": {k: v for k, v in spec["init_args"].items() if k not in drop}}


def parse_guidance(guidance: float | Sequence[float]) -> tuple[float | None, tuple[float, float] | None]:
    """``guidance`` as (fixed scale, None) for a number or (None, (w_min, w_max)) for a pair; one line otherwise."""
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
        if not float(guidance) >= 0:
            raise LitGenError(f"guidance must be >= 0, got {guidance}")
        return float(guidance), None
    values = list(guidance) if isinstance(guidance, Sequence) and not isinstance(guidance, str) else None
    if values is None or len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
        raise LitGenError(f"guidance must be a number or a pair [w_min, w_max], got {guidance!r}")
    lo, hi = float(values[0]), float(values[1])
    if not 0 <= lo <= hi:
        raise LitGenError(f"guidance [w_min, w_max] needs 0 <= w_min <= w_max, got [{values[0]}, {values[1]}]")
    return None, (lo, hi)


def with_guidance_embed(net: nn.Module) -> nn.Module:
    """A copy of ``net`` that also takes the guidance weight (``guidance_embed=True``), with ``net``'s weights and a
    zero-initialised w embedding (so it computes what ``net`` computes at every w). One line for a network class
    without that input."""
    if getattr(net, "map_guide", None) is not None:
        return net
    if "guidance_embed" not in inspect.signature(type(net).__init__).parameters:
        raise LitGenError(
            f"a w-conditioned student (guidance: [w_min, w_max]) needs a network with a guidance input "
            f"(UNet, DiT, MLPDenoiser); {type(net).__name__} has none"
        )
    spec = describe(net)
    copy_ = build({**spec, "init_args": {**spec["init_args"], "guidance_embed": True}})
    missing, unexpected = copy_.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("map_guide.") for k in missing), (missing, unexpected)
    return copy_.train(net.training).requires_grad_(any(p.requires_grad for p in net.parameters()))


class GuidedLabel:
    """A batch's class labels together with its per-sample guidance weights, indexed together (``cond[rows]``), so
    ODE helpers that evaluate a subset of rows (TRACT's Heun corrector, the second hop) keep w aligned."""

    def __init__(self, label: Tensor | None, w: Tensor) -> None:
        self.label = label
        self.w = w

    def __getitem__(self, rows: Tensor) -> GuidedLabel:
        return GuidedLabel(None if self.label is None else self.label[rows], self.w[rows])


def split_label(cond: Tensor | GuidedLabel | None) -> tuple[Tensor | None, Tensor | None]:
    """(label, w) of a plain label (w None) or a ``GuidedLabel``."""
    if isinstance(cond, GuidedLabel):
        return cond.label, cond.w
    return cond, None


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
        guidance: guidance scale of the teacher being distilled (1 = unguided), or a pair [w_min, w_max]: a
            w-conditioned student, w ~ U[w_min, w_max] per sample (Meng et al. 2023).
        guide_teacher: path to a guiding ("bad") model for autoguidance, D_bad + w (D − D_bad) (Karras et al.
            2024); None = classifier-free guidance (or the guiding model the teacher file carries).
        init_from_teacher: start the student from the teacher's weights (needs the same architecture; the dropout
            rate may differ).
        student_dropout: dropout rate of the student when it is the teacher's architecture (and of any other
            trained copy of the teacher, e.g. f-distill's fake score); 0 = none (the references' setting),
            None = the teacher's rate. Ignored when ``net`` is given (its own rate holds).
        optimizer: optimizer factory for the student.
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant).
        teacher_zero3: under DeepSpeed ZeRO-3, ``partition`` the frozen teacher with the student (P_T·b/N bytes per
            rank) or ``replicate`` it on every rank in the compute dtype (P_T·b bytes, no gathers); ignored otherwise.
        guidance_stage_one: the first N steps regress the student onto the guided teacher's x̂ (Meng et al. 2023,
            stage one; ``stage_one_loss``); methods that support it count them in their own schedule.
    """

    method_name = "distill"
    # The students keep EMA / target / teacher copies of the network; under ZeRO-3 their parameters are partitioned
    # placeholders, so a method may only run it once every place that reads or writes those copies outside a forward
    # goes through lit_gen.scale.zero3 (TRACT, CD and f-distill do, tested in tests/test_scale_zero3.py).
    supports_zero3 = False

    def __init__(
        self,
        teacher: str,
        net: nn.Module | None = None,
        param: EDM | VP | None = None,
        guidance: float | list[float] = 1.0,
        init_from_teacher: bool = True,
        student_dropout: float | None = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        guide_teacher: str | None = None,
        teacher_zero3: str = "partition",
        guidance_stage_one: int = 0,
    ) -> None:
        fixed_guidance, guidance_range = parse_guidance(guidance)
        if not (isinstance(guidance_stage_one, int) and guidance_stage_one >= 0):
            raise LitGenError(f"guidance_stage_one must be a number of steps >= 0, got {guidance_stage_one!r}")
        if guidance_stage_one and guidance_range is None and fixed_guidance == 1.0 and guide_teacher is None:
            raise LitGenError(
                "guidance_stage_one distils the guided teacher into the student (Meng et al. 2023, stage one); "
                "it needs guidance != 1 or a range [w_min, w_max]"
            )
        check_teacher_zero3(teacher_zero3)
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
        if guidance_range is not None:
            if net is not None and getattr(net, "map_guide", None) is None:
                raise LitGenError(
                    "guidance [w_min, w_max] needs a student with a guidance input: set guidance_embed: true in "
                    "model.init_args.net (or leave net unset to use the teacher's architecture)"
                )
            student = with_guidance_embed(student)
        if init_from_teacher:
            if _without_dropout(describe(student)) != _without_dropout(describe(loaded.net)):
                raise LitGenError(
                    f"the student network {describe(student)} differs from the teacher's {describe(loaded.net)}; "
                    "use the teacher's architecture or set model.init_from_teacher false"
                )
            missing, unexpected = student.load_state_dict(loaded.net.state_dict(), strict=False)
            if unexpected or any(not k.startswith("map_guide.") for k in missing):
                raise LitGenError(f"the teacher's weights do not fit the student (e.g. {(unexpected or missing)[0]})")
        super().__init__(
            net=student,
            param=param if param is not None else loaded.param,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
        )
        self.teacher_path = str(teacher)
        self.teacher_zero3 = teacher_zero3
        self.teacher_description = {k: v for k, v in loaded.description.items() if k != "weights"}
        self.teacher_net = loaded.net.requires_grad_(False).eval()
        self.guidance = fixed_guidance
        self.guidance_range = guidance_range
        self.guidance_stage_one = int(guidance_stage_one)
        # The guiding ("bad") model of autoguidance: named by guide_teacher, or carried by the teacher file. Kept as
        # a frozen submodule (saved under ``guide_net.``), so a checkpoint is self-contained like the teacher.
        self.guide_teacher_path = str(guide_teacher) if guide_teacher is not None else None
        guide_model = self._load_guide(guide_teacher, loaded, str(teacher))
        self.guide_net = guide_model.net.requires_grad_(False).eval() if guide_model is not None else None
        self.guide_param = guide_model.param if guide_model is not None else None
        guided = guidance_range is not None or fixed_guidance != 1.0
        if guided and self.guide_net is None and self.teacher_num_classes == 0:
            raise LitGenError(
                f"guidance {guidance} needs a class-conditional teacher (classifier-free) or a guide_teacher "
                f"(autoguidance); {teacher} has no classes"
            )
        self.data_info = loaded.data_info

    def _load_guide(self, guide_teacher: str | None, loaded: LoadedModel, teacher: str) -> LoadedModel | None:
        """The guiding model, checked against the teacher: same data shape and the same class count (one line)."""
        if guide_teacher is None:
            return getattr(loaded, "guide", None)
        path = Path(guide_teacher)
        if not path.exists():
            raise LitGenError(f"guide_teacher {path} does not exist (a .ckpt or .safetensors of the guiding model)")
        try:
            guide_model = load_model(path, weights="ema")
        except LitGenError as err:
            raise LitGenError(f"guide_teacher {path}: {err}") from None
        check_guide(guide_model, loaded, str(path), teacher)
        return guide_model

    def init_without_teacher(
        self,
        net: nn.Module,
        param: EDM | VP,
        optimizer: OptimizerCallable,
        warmup_steps: int,
        decay_steps: int,
        teacher_zero3: str = "partition",
    ) -> None:
        """The set-up of a subclass trained without a teacher file (consistency training, sCT) in place of
        ``__init__``: the plain ``GenerativeMethod`` one, with the teacher fields empty."""
        GenerativeMethod.__init__(
            self, net=net, param=param, optimizer=optimizer, warmup_steps=warmup_steps, decay_steps=decay_steps
        )
        self.teacher_path = None
        self.teacher_zero3 = teacher_zero3
        self.teacher_description = {}
        self.teacher_net = None
        self.guidance = 1.0
        self.guidance_range = None
        self.guidance_stage_one = 0
        self.guide_net = self.guide_param = self.guide_teacher_path = None

    # ------------------------------------------------------------------------------------------------ the teacher
    @property
    def teacher_num_classes(self) -> int:
        """The teacher's class count (0 without a teacher: consistency training, sCT)."""
        if self.teacher_net is None:
            return 0
        return int(self.teacher_net.init_args.get("num_classes", 0) or 0)

    # ------------------------------------------------------------------------------------- ZeRO-3: frozen copies
    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False) and getattr(self, "teacher_zero3", "partition") == "replicate":
            self.replicate_frozen(strategy)

    def replicate_frozen(self, strategy: Any) -> None:
        """Take the frozen teacher (and guiding model) out of the module tree before ``deepspeed.initialize``, so
        ZeRO-3 neither partitions nor hooks them: a full copy per rank on the training device, in the compute dtype
        (what DeepSpeed's precision casts the engine's module to). They stay reachable as attributes."""
        dtype = getattr(strategy.precision_plugin, "_desired_dtype", torch.float32)
        names = list(getattr(self, "replicated_copies", []))
        for name in ("teacher_net", "guide_net"):
            module = self._modules.pop(name, None)
            if module is None:
                continue
            module.to(device=strategy.root_device, dtype=dtype)
            object.__setattr__(self, name, module)  # a plain attribute: not in state_dict(), parameters(), to()
            names.append(name)
        self.replicated_copies = names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        names = getattr(self, "replicated_copies", [])
        if names:
            checkpoint["lit_gen"]["teacher_zero3"] = "replicate"
            if self.global_rank == 0:  # one copy on disk: every rank holds the same weights
                state = {f"{n}.{k}": v for n in names for k, v in getattr(self, n).state_dict().items()}
                checkpoint[REPLICATED_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        check_resume(self, checkpoint)  # a LoRA run resumes over the teacher it was trained from (lit_gen.nets.lora)
        names = getattr(self, "replicated_copies", [])
        if not names:
            return
        import torch.distributed as dist

        saved = checkpoint.get(REPLICATED_KEY)
        distributed = dist.is_available() and dist.is_initialized()
        found = bool(self.trainer.strategy.broadcast(saved is not None, src=0)) if distributed else saved is not None
        if not found:
            raise LitGenError(
                "the checkpoint has no replicated teacher (it was written with model.teacher_zero3 partition); "
                "resume with the same teacher_zero3"
            )
        with torch.no_grad():
            for name in names:
                for key, tensor in getattr(self, name).state_dict().items():
                    if self.global_rank == 0:
                        tensor.copy_(saved[f"{name}.{key}"])
                    if distributed:
                        dist.broadcast(tensor, src=0)

    def train(self, mode: bool = True) -> DistillationMethod:
        """Lightning puts the module in train mode at fit start; the frozen teacher (and guide) stay in eval mode."""
        super().train(mode)
        if self.teacher_net is not None:
            self.teacher_net.eval()
        if getattr(self, "guide_net", None) is not None:
            self.guide_net.eval()
        return self

    def sample_guidance(self, batch_size: int, device: torch.device) -> Tensor | None:
        """Per-sample guidance weights w ~ U[w_min, w_max] (Meng et al. 2023, Alg. 1) for a w-conditioned student,
        None otherwise. A degenerate range [w, w] draws nothing (the RNG stream equals the fixed-w run's)."""
        if getattr(self, "guidance_range", None) is None:
            return None
        lo, hi = self.guidance_range
        if lo == hi:
            return torch.full((batch_size,), lo, device=device, dtype=torch.float32)
        return lo + (hi - lo) * torch.rand(batch_size, device=device, dtype=torch.float32)

    @property
    def teacher_parameterisation(self) -> Any:
        """The parameterisation the teacher is stepped with: ``teacher_param`` where the student has its own (CD's
        consistency function), else the shared ``param``."""
        param = getattr(self, "teacher_param", None)
        return self.param if param is None else param

    def in_stage_one(self) -> bool:
        """Whether this optimizer step is one of the ``guidance_stage_one`` steps."""
        return int(self.global_step) < getattr(self, "guidance_stage_one", 0)

    def stage_one_loss(self, y: Tensor, label: Tensor | None) -> Tensor:
        """Meng et al. 2023 ("On Distillation of Guided Diffusion Models"), Sec. 4.1 eq. 6, stage one: the student
        x̂_θ(x_σ; σ, w) regresses onto the guided teacher x̂^w(x_σ; σ) = x̂_∅ + w (x̂_c − x̂_∅) (or the autoguided
        D_bad + w (D − D_bad)) at the same input x_σ = y + σ n, σ from the teacher's training noise distribution,
        weighted as TRACT's x-loss (EDM: λ(σ), a unit MSE on F; VP: max(SNR, 1)). Shape [B]. Draws σ, n, then w."""
        teacher_param = self.teacher_parameterisation
        dtype = torch.promote_types(y.dtype, torch.float32)
        y = y.to(dtype)
        sigma = teacher_param.sample_sigma(y.shape[0], device=y.device, dtype=dtype)
        x = y + sigma.view(-1, *([1] * (y.ndim - 1))) * torch.randn_like(y)
        w = self.sample_guidance(y.shape[0], y.device)
        target = self.teacher_denoise(x, sigma, label, w)
        x_hat = self.param.denoise(bind_guidance(self.net, w), x, sigma, label)
        return x_loss_weight(teacher_param, sigma) * (x_hat - target).pow(2).reshape(y.shape[0], -1).mean(dim=1)

    @torch.no_grad()
    def teacher_denoise(self, x: Tensor, sigma: Tensor, label: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """The guided teacher's x̂(x; σ) in VE coordinates, without gradient, at the fixed ``guidance`` or at the
        per-sample weights ``w`` ([B]).

        Classifier-free (Ho & Salimans 2022): x̂_∅ + w (x̂_c − x̂_∅), one batched call with the null class.
        Autoguidance (Karras et al. 2024, eq. 1) when a guiding model is set: D_bad + w (D − D_bad).
        """
        param = self.teacher_parameterisation
        scale: float | Tensor = w if w is not None else (self.guidance if self.guidance is not None else 1.0)
        unguided = not isinstance(scale, Tensor) and scale == 1.0
        if getattr(self, "guide_net", None) is not None:
            good = param.denoise(self.teacher_net, x, sigma, label)
            if unguided:
                return good
            bad = self.guide_param.denoise(self.guide_net, x, sigma, label if self.guide_num_classes else None)
            return guide(good, bad.to(good.dtype), scale)
        if unguided or label is None:
            return param.denoise(self.teacher_net, x, sigma, label)
        null = torch.full_like(label, self.teacher_num_classes)
        both = param.denoise(self.teacher_net, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null]))
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, scale)

    @property
    def guide_num_classes(self) -> int:
        return int(self.guide_net.init_args.get("num_classes", 0) or 0) if self.guide_net is not None else 0

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

    def trainable_parameters(self) -> Any:
        """The student's trainable parameters (a LoRA student's adapters, not its frozen shared base)."""
        return [p for p in self.net.parameters() if p.requires_grad]

    # ---------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        section = super().describe()
        if getattr(self, "lora_info", None) is not None:
            section["lora"] = dict(self.lora_info)  # read by lit_gen.export (merge) and by check_resume
        section["teacher"] = {"path": self.teacher_path, "guidance": self.guidance}
        guidance_range = getattr(self, "guidance_range", None)  # subclasses without a teacher (sCT) skip __init__
        if guidance_range is not None:
            section["teacher"]["guidance_range"] = list(guidance_range)
            # read by lit_gen.export: `lit-gen sample --guidance w` feeds w to the student, inside this range
            section["guidance_range"] = list(guidance_range)
        if getattr(self, "guide_net", None) is not None:
            section["teacher"]["guide_teacher"] = self.guide_teacher_path or "carried by the teacher file"
            section["teacher"]["guidance_kind"] = "autoguidance"
        return section


def check_teacher_zero3(value: str) -> None:
    if value not in TEACHER_ZERO3:
        raise LitGenError(f"unknown teacher_zero3 {value!r}; choose one of: {', '.join(TEACHER_ZERO3)}")


def check_guide(guide_model: LoadedModel, teacher: LoadedModel, guide_path: str, teacher_path: str) -> None:
    """A guiding model must model the same data: the same shape and the same class count as the teacher."""
    guide_shape = list((guide_model.description.get("data") or {}).get("shape", []))
    teacher_shape = list((teacher.description.get("data") or {}).get("shape", []))
    if guide_shape != teacher_shape:
        raise LitGenError(
            f"the guiding model {guide_path} was trained on data of shape {guide_shape} but the teacher "
            f"{teacher_path} on {teacher_shape}"
        )
    if guide_model.num_classes != teacher.num_classes:
        raise LitGenError(
            f"the guiding model {guide_path} has {guide_model.num_classes} classes but the teacher {teacher_path} "
            f"has {teacher.num_classes}"
        )
