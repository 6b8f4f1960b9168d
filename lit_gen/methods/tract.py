"""TRACT, with binary time-distillation (progressive distillation) as its two-step-segment special case.

TRACT (Berthelot et al. 2023, "TRACT: Denoising Diffusion Models with Transitive Closure Time-Distillation", Alg. 1)
and BTD (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Alg. 2) are one
LightningModule; ``target: btd`` with a halving ``schedule`` is BTD. The maths lives in ``lit_gen.diffusion.tract``.
Per optimizer step (phase p of the ``schedule``):

    indices t, t1, s on the base grid (``PhaseSchedule.sample_indices``); x_t = y + σ_t n
    x̃ = closure_target(teacher hop t → t1, second hop t1 → s)      (TRACT: self-teacher; BTD: teacher)
    loss = mean w(σ_t)·(x̂_θ(x_t; σ_t) − x̃)²                         (``x_loss_weight``: MSE on F for EDM,
                                                                       max(SNR, 1) for VP)
    after the step: self-teacher ← EMA(µ_S) of the student, inference EMA ← EMA(µ_I = ρ^{1/N_p}), both
    bias-corrected so their first update copies the student (TRACT's ModuleEMA).

At a phase change the teacher becomes the inference EMA; the student, the self-teacher and the inference EMA go on
unchanged (tc_distill.py, default ``reset=none``). The teacher of phase 0 is the loaded (optionally CFG-guided)
teacher stepped with ``teacher_solver``; from phase 1 on it is a distilled student, stepped by one DDIM jump and
never guided again (it already is).

A w-conditioned student (``guidance: [w_min, w_max]``, Meng et al. 2023) draws w per sample; the phase-0 teacher is
guided at that w, and every distilled network in the target (self-teacher, the previous phase's student) is called
at the same w. The labels travel with w as ``GuidedLabel`` through the hops, so the rows a hop evaluates keep their
own w. The teacher network then carries a zero-initialised w embedding too (it becomes a w-conditioned student at
the first phase change).

Decisions where the papers and the reference code differ (ALGORITHMS.md §6): the loss is averaged over elements
(like the rest of lit_gen and Salimans & Ho; TRACT's code sums over pixels, a constant factor that Adam absorbs
but that changes the meaning of ``gradient_clip_val``); x̂ clipping inside the DDIM jumps is ``clip_denoised``
(1.0 in the image recipes, as TRACT's code; off for toy points, which are not bounded to [−1, 1]).

State for an exact resume lives in the module: ``phase``, the EMA update counters (buffers), the current teacher
(``teacher_net.``), the self-teacher and the inference EMA (submodules); the noise, indices and dropout of step k
are drawn from an RNG seeded by (``seed``, k, rank), so a resumed run draws what the uninterrupted one would have.

DeepSpeed ZeRO-3 (issue 20): the inference EMA and the self-teacher are frozen submodules that ZeRO-3 partitions with
the student; their updates and the teacher swap at a phase change run inside ``lit_gen.scale.zero3.gathered_copy``
(full weights of both networks for the length of the update, rank 0's result re-partitioned). The teacher is
partitioned or replicated by ``teacher_zero3`` (``lit_gen.methods.distill``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.diffusion import EDM, VP
from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.diffusion.tract import (
    GRIDS,
    TEACHER_SOLVERS,
    Hop,
    PhaseSchedule,
    base_grid,
    check_target,
    closure_target,
    denoiser_hop,
    ema_update_,
    ema_weight,
    inference_momentum,
    x_loss_weight,
)
from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod, GuidedLabel, split_label, with_guidance_embed
from lit_gen.nets.lora import LoRASpec, adapt_method
from lit_gen.scale.zero3 import gathered_copy

EMA_PREFIX = "net_ema."


class TRACT(DistillationMethod):
    """TRACT / binary time-distillation student (Berthelot et al. 2023, Alg. 1; Salimans & Ho 2022, Alg. 2).

    Args:
        teacher: path to the teacher (``.ckpt`` from ``lit-gen fit`` or ``.safetensors`` from ``lit-gen export``).
        schedule: sampling steps per phase boundary, S_0 > S_1 > … (S_0 = the teacher grid T; each divides the
            previous): TRACT-VP [1024, 32, 1], TRACT-EDM [40, 1], BTD [T, T/2, …, 1].
        steps_per_phase: optimizer steps of each phase (one int, or one per phase); max_steps must not exceed
            their sum.
        target: "tract" (transitive closure with the self-teacher) or "btd" (two teacher steps per segment;
            needs a halving schedule). See ``lit_gen.diffusion.tract.TARGETS``.
        grid: base grid, "karras" (EDM) or "cosine" (VP uniform t); None = by the teacher's parameterisation.
        rho: ρ of the Karras grid.
        teacher_solver: phase-0 teacher step, "heun" or "euler" (DDIM); None = Heun for EDM, DDIM for VP.
        self_teacher_momentum: µ_S of the self-teacher EMA (TRACT: 0.5).
        ema_residual: ρ of the inference EMA, µ_I = ρ^{1/N_phase} (TRACT: 1e-3).
        clip_denoised: clip x̂ to [−c, c] inside the DDIM jumps (TRACT's code: 1 for images); None = no clip.
        lr_decay_per_phase: the learning rate decays linearly to 0 within every phase (progressive distillation).
        seed: seed of the per-step noise/index/dropout RNG (mixed with the step and the rank).
        net: the student network; None = the teacher's architecture.
        param: the parameterisation; None = the teacher's (another one is an error).
        guidance: guidance scale of the phase-0 teacher (1 = unguided), or [w_min, w_max] for a w-conditioned
            student (Meng et al. 2023).
        guide_teacher: a guiding model for autoguidance of the phase-0 teacher (Karras et al. 2024).
        init_from_teacher: start the student from the teacher's weights.
        student_dropout: dropout of the student copied from the teacher; 0 = none (the
            references' setting), null = the teacher's rate.
        optimizer: optimizer factory for the student.
        warmup_steps: linear learning-rate warm-up at the start of the run, in optimizer steps.
        lora: LoRA adapters instead of a full student, e.g. {rank: 8, alpha: 8, targets: [...]} (alpha = rank and
            per-network targets by default; ``lit_gen.nets.lora``); null = train every weight.
        teacher_zero3: under DeepSpeed ZeRO-3, ``partition`` or ``replicate`` the frozen teacher (see
            ``lit_gen.methods.distill``).
        guidance_stage_one: the first N steps of phase 0 regress the student onto the guided teacher's x̂ (Meng et
            al. 2023, stage one); then the phases go on from that w-aware student. 0 = none.
    """

    method_name = "tract"
    default_sampler = "ddim"
    supports_zero3 = True  # EMA, self-teacher and teacher swap gather through lit_gen.scale.zero3

    def __init__(
        self,
        teacher: str,
        schedule: tuple[int, ...] = (40, 1),
        steps_per_phase: int | list[int] = 1000,
        target: str = "tract",
        grid: str | None = None,
        rho: float = 7.0,
        teacher_solver: str | None = None,
        self_teacher_momentum: float = 0.5,
        ema_residual: float = 1e-3,
        clip_denoised: float | None = None,
        lr_decay_per_phase: bool = False,
        seed: int = 0,
        net: nn.Module | None = None,
        param: EDM | VP | None = None,
        guidance: float | list[float] = 1.0,
        init_from_teacher: bool = True,
        student_dropout: float | None = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        guide_teacher: str | None = None,
        lora: LoRASpec | None = None,
        teacher_zero3: str = "partition",
        guidance_stage_one: int = 0,
    ) -> None:
        super().__init__(
            teacher=teacher,
            net=net,
            param=param,
            guidance=guidance,
            guide_teacher=guide_teacher,
            init_from_teacher=init_from_teacher,
            student_dropout=student_dropout,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            teacher_zero3=teacher_zero3,
            guidance_stage_one=guidance_stage_one,
        )
        self.phases = PhaseSchedule.from_config(schedule, steps_per_phase)
        if self.guidance_stage_one >= self.phases.updates[0]:
            raise LitGenError(
                f"guidance_stage_one ({self.guidance_stage_one}) takes its steps from phase 0, which has "
                f"{self.phases.updates[0]}; give phase 0 more steps (steps_per_phase) or stage one fewer"
            )
        check_target(target, self.phases)
        is_vp = getattr(self.param, "kind", "") == "vp"
        self.target = target
        self.grid_kind = grid if grid is not None else ("cosine" if is_vp else "karras")
        if self.grid_kind not in GRIDS:
            raise LitGenError(f"unknown grid {self.grid_kind!r}; choose one of {', '.join(GRIDS)}")
        self.teacher_solver = teacher_solver if teacher_solver is not None else ("euler" if is_vp else "heun")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise LitGenError(
                f"unknown teacher_solver {self.teacher_solver!r}; choose one of {', '.join(TEACHER_SOLVERS)}"
            )
        if not 0.0 <= self_teacher_momentum < 1.0:
            raise LitGenError(f"self_teacher_momentum must be in [0, 1), got {self_teacher_momentum}")
        if not 0.0 < ema_residual < 1.0:
            raise LitGenError(f"ema_residual must be in (0, 1), got {ema_residual}")
        if clip_denoised is not None and not clip_denoised > 0:
            raise LitGenError(f"clip_denoised must be positive or null, got {clip_denoised}")
        self.self_teacher_momentum = float(self_teacher_momentum)
        self.ema_residual = float(ema_residual)
        self.clip = clip_denoised
        self.lr_decay_per_phase = lr_decay_per_phase
        self.seed = int(seed)
        self.grid64 = base_grid(self.param, self.phases.base_steps, self.grid_kind, rho)

        if self.guidance_range is not None and len(self.phases.updates) > 1:
            # From phase 1 the teacher is a w-conditioned student: give it the (zero, hence inert) w embedding now.
            self.teacher_net = with_guidance_embed(self.teacher_net).requires_grad_(False).eval()
        # µ_I inference EMA (exported / sampled through describe()["ema_prefix"]) and the µ_S self-teacher.
        self.net_ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.self_teacher = copy.deepcopy(self.net).requires_grad_(False).eval() if target == "tract" else None
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("self_teacher_updates", torch.zeros((), dtype=torch.long))
        # LoRA: the copies share the teacher's frozen base; from phase 1 the teacher is the student's EMA, so it
        # carries (zero, frozen) adapters too and takes the EMA's at each phase change.
        followers = {"net_ema": "net", "self_teacher": "net"}
        adapt_method(self, lora, ("net",), followers | ({"teacher_net": "net"} if len(self.phases.updates) > 1 else {}))

    # ------------------------------------------------------------------------------------------------ set-up
    def train(self, mode: bool = True) -> TRACT:
        """The teacher, the self-teacher and the inference EMA never train (no dropout in the targets)."""
        super().train(mode)
        self.net_ema.eval()
        if self.self_teacher is not None:
            self.self_teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        max_steps = getattr(self.trainer, "max_steps", -1) if self._trainer is not None else -1
        if max_steps is not None and max_steps > self.phases.total_updates:
            raise LitGenError(
                f"trainer.max_steps {max_steps} is past the end of the phase schedule "
                f"({' + '.join(map(str, self.phases.updates))} = {self.phases.total_updates} steps); "
                "set model.steps_per_phase or trainer.max_steps to agree"
            )

    def lr_factor(self, step: int) -> float:
        """Warm-up at the start of the run; with ``lr_decay_per_phase`` a linear decay to 0 within each phase
        (Salimans & Ho 2022, Sec. 5: learning rate annealed linearly to 0 in every halving phase)."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.lr_decay_per_phase:
            phase = self.phases.phase_at(step)
            length = self.phases.updates[phase]
            factor *= max(0.0, (length - (step - self.phases.phase_start(phase))) / length)
        return factor

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.warmup_steps <= 0 and not self.lr_decay_per_phase:
            return optimizer
        # From recipe numbers, never from trainer.estimated_stepping_batches (Lightning #20550).
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------- phases
    @torch.no_grad()
    def enter_phase(self, phase: int) -> None:
        """Advance to ``phase``: at every phase change the teacher becomes the inference EMA (TRACT Sec. 3.2)."""
        while int(self.phase) < phase:
            with gathered_copy(self.teacher_net, self.net_ema):
                self.teacher_net.load_state_dict(self.net_ema.state_dict())
            self.phase.add_(1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.enter_phase(self.phases.phase_at(self.global_step))

    def teacher_hop(self) -> Hop:
        """Phase 0: the loaded (guided) teacher with ``teacher_solver``; later: the previous student, one DDIM jump."""
        if int(self.phase) == 0:

            def teacher(x: Tensor, sigma: Tensor, cond: Tensor | GuidedLabel | None) -> Tensor:
                label, w = split_label(cond)
                return self.teacher_denoise(x, sigma, label, w)

            return denoiser_hop(teacher, solver=self.teacher_solver, clip=self.clip)

        def previous_student(x: Tensor, sigma: Tensor, cond: Tensor | GuidedLabel | None) -> Tensor:
            label, w = split_label(cond)
            return self.param.denoise(bind_guidance(self.teacher_net, w), x, sigma, label)

        return denoiser_hop(previous_student, solver="euler", clip=self.clip)

    def self_teacher_hop(self) -> Hop:
        """TRACT: the self-teacher's DDIM jump x̂ + (σ_s/σ_t)(x − x̂); BTD: a second teacher step."""
        if self.self_teacher is None:
            return self.teacher_hop()

        def self_teacher(x: Tensor, sigma: Tensor, cond: Tensor | GuidedLabel | None) -> Tensor:
            label, w = split_label(cond)
            return self.param.denoise(bind_guidance(self.self_teacher, w), x, sigma, label)

        return denoiser_hop(self_teacher, solver="euler", clip=self.clip)

    # ----------------------------------------------------------------------------------------------- training
    def step_seed(self) -> int:
        return (self.seed * 1_000_003 + int(self.global_step)) * 4099 + int(self.global_rank)

    def distillation_loss(self, y: Tensor, label: Tensor | None) -> Tensor:
        """Per-sample w(σ_t)·mean (x̂_θ(x_t; σ_t) − x̃)² (TRACT Alg. 1 / Salimans & Ho 2022 Alg. 2). Shape [B].
        During ``guidance_stage_one`` Meng et al.'s stage-one regression onto the guided teacher instead."""
        if self.in_stage_one():
            return self.stage_one_loss(y, label)
        phase = int(self.phase)
        i_t, i_t1, i_s = self.phases.sample_indices(phase, y.shape[0], self.target)
        dtype = torch.promote_types(y.dtype, torch.float32)
        sigma_t, sigma_t1, sigma_s = (self.grid64[i].to(device=y.device, dtype=dtype) for i in (i_t, i_t1, i_s))
        y = y.to(dtype)
        x_t = y + sigma_t.view(-1, *([1] * (y.ndim - 1))) * torch.randn_like(y)
        w = self.sample_guidance(y.shape[0], y.device)
        cond = label if w is None else GuidedLabel(label, w)
        with torch.no_grad():
            target = closure_target(self.teacher_hop(), self.self_teacher_hop(), x_t, sigma_t, sigma_t1, sigma_s, cond)
        x_hat = self.param.denoise(bind_guidance(self.net, w), x_t, sigma_t, label)
        weight = x_loss_weight(self.param, sigma_t)
        return weight * (x_hat - target).pow(2).reshape(y.shape[0], -1).mean(dim=1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        devices = list(range(torch.cuda.device_count())) if y.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step_seed())
            loss = self.distillation_loss(y, label).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("train/phase", self.phase.float(), batch_size=y.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step: self-teacher (µ_S) and inference EMA (µ_I of this phase), bias-corrected.

        Done here rather than in ``on_train_batch_end`` because callbacks (the checkpoint) see that hook first: a
        checkpoint written at step k must hold the EMAs after update k.
        """
        super().optimizer_step(*args, **kwargs)
        self.update_emas()

    @torch.no_grad()
    def update_emas(self) -> None:
        if self.self_teacher is not None:
            self.self_teacher_updates.add_(1)
            weight = ema_weight(self.self_teacher_momentum, int(self.self_teacher_updates))
            with gathered_copy(self.self_teacher, self.net):
                ema_update_(self.self_teacher, self.net, weight)
        self.ema_updates.add_(1)
        momentum = inference_momentum(self.ema_residual, self.phases.updates[int(self.phase)])
        with gathered_copy(self.net_ema, self.net):
            ema_update_(self.net_ema, self.net, ema_weight(momentum, int(self.ema_updates)))

    # ------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        """Adds the student's own sampling grid (segment boundaries of the current phase, DDIM between them),
        the inference EMA's state-dict prefix and the TRACT settings."""
        section = super().describe()
        phase = int(self.phase)
        section["sampling"] = {
            "sampler": self.default_sampler,
            "steps": self.phases.student_steps(phase),
            "grid": self.phases.student_grid(self.grid64, phase),
            "grid_exact": True,
        }
        section["ema_prefix"] = EMA_PREFIX
        section["tract"] = {
            "target": self.target,
            "schedule": list(self.phases.steps),
            "steps_per_phase": list(self.phases.updates),
            "phase": phase,
            "grid": self.grid_kind,
            "teacher_solver": self.teacher_solver,
            "guidance_stage_one": self.guidance_stage_one,
        }
        return section
