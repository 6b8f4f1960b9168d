"""Consistency distillation (CD) and consistency training (CT) in one LightningModule.

Song et al. 2023, "Consistency Models" (CM), Alg. 2 (CD) and Alg. 3 (CT); Song & Dhariwal 2023, "Improved
Techniques for Training Consistency Models" (iCT); ALGORITHMS.md §4. The maths lives in
``lit_gen.diffusion.consistency``. Per optimizer step k:

    N = N(k) (fixed ``num_scales`` for CD; iCT's doubling curriculum when ``curriculum_steps`` > 0)
    σ_0 = σ_min < … < σ_{N−1} = σ_max (``consistency_grid``); n ~ U{0..N−2} or iCT's discretised log-normal
    x_{n+1} = y + σ_{n+1} z
    CD: x̂_n = one teacher ODE step (Heun or Euler) from σ_{n+1} to σ_n            (CM eq. 6, Alg. 2)
    CT: x̂_n = y + σ_n z (the same z)                                              (CM Alg. 3)
    loss = λ(σ_n) d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n))                         (CM eq. 7 / iCT eq. 6)
    after the optimizer step: θ⁻ ← µ θ⁻ + (1 − µ) θ (stop-gradient; µ = 0: θ⁻ = θ, iCT)

f is ``ConsistencyParam.denoise`` (σ_min-shifted c_skip/c_out: f(x, σ_min) = x exactly), built from the teacher's
EDM settings. The online and target passes share one dropout draw (the RNG state is saved before the target pass and
restored for the online pass, as CM's code does). The student's own σ points go into the checkpoint's sampling
section with the ``"consistency"`` sampler (CM Alg. 1), so ``lit-gen sample --steps K`` picks K of them.

Decisions where the papers and the reference code differ (ALGORITHMS.md §6): the target update is the paper's
θ⁻ ← sg(µθ⁻ + (1 − µ)θ) with a fixed µ (CM's code also has an adaptive µ(N) for CT; iCT drops the EMA: µ = 0); the
inference EMA is ``callbacks.ema.EMA`` on ``net`` (CM's ``ema_rate``), kept apart from the target network; the L2
distance averages over elements (CM's code, ``mean_flat``), pseudo-Huber is on the whole vector (iCT).

Consistency training needs no teacher (``teacher`` null, then ``net`` is required and ``param`` gives the EDM
settings); with a teacher it only initialises the student (ECT's "start from the teacher") and is not kept.

State for an exact resume lives in the module: the target network (``target_net.``), the curriculum position
(buffer ``num_scales_now``); the noise, σ indices and dropout of step k come from an RNG seeded by (``seed``, k,
rank), so a resumed run draws what the uninterrupted one would have.

DeepSpeed ZeRO-3 (issue 20): the target network is a frozen submodule that ZeRO-3 partitions with the student; its
update runs inside ``lit_gen.scale.zero3.gathered_copy``. The inference EMA callback gathers for itself. The teacher
is partitioned or replicated by ``teacher_zero3`` (``lit_gen.methods.distill``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.diffusion import EDM
from lit_gen.diffusion.consistency import (
    DISTANCES,
    ODE_SOLVERS,
    ConsistencyParam,
    consistency_grid,
    get_distance,
    ict_loss_weight,
    ict_num_scales,
    ict_sigma_probs,
    ode_step,
)
from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod, check_teacher_zero3
from lit_gen.methods.replay import rng_state, set_rng_state
from lit_gen.nets.lora import LoRASpec, adapt_method
from lit_gen.scale.zero3 import gathered_copy

TRAINING_MODES = ("cd", "ct")
SIGMA_SAMPLING = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "ict")


class ConsistencyDistillation(DistillationMethod):
    """Consistency model student: CD from a frozen EDM teacher, or CT without one (CM Alg. 2/3, iCT).

    Args:
        teacher: path to the EDM teacher (``.ckpt`` or exported ``.safetensors``). Needed for CD; for CT it only
            initialises the student (null = train from ``net``'s random init).
        training: "cd" (consistency distillation, teacher ODE step) or "ct" (consistency training, x̂_n = y + σ_n z).
        num_scales: N, the number of σ boundaries (CM CIFAR-10 CD: 18; iCT: the curriculum's final 1281).
        curriculum_steps: K of iCT's doubling curriculum N(k) from ``initial_scales`` to ``num_scales`` over K
            optimizer steps (0 = fixed N).
        initial_scales: N(0) of the curriculum (iCT: 11).
        rho: ρ of the Karras σ grid (7).
        teacher_solver: CD's teacher ODE step, "heun" (CM) or "euler".
        distance: d(·,·): "l2", "l1", "pseudo_huber" (iCT, c = 0.00054√dim) or "lpips" (needs VGG16 weights on disk).
        target_momentum: µ of the target network θ⁻ ← µθ⁻ + (1 − µ)θ (CM CIFAR-10: 0; ImageNet-64: 0.95; iCT: 0).
        sigma_sampling: choice of n: "uniform" (CM) or "lognormal" (iCT's discretised log-normal).
        p_mean: P_mean of the log-normal σ sampling (iCT: −1.1).
        p_std: P_std of the log-normal σ sampling (iCT: 2.0).
        weighting: λ(σ_n): "uniform" (CM) or "ict" (1/(σ_{n+1} − σ_n)).
        sampling_points: number of σ points the checkpoint offers to ``lit-gen sample --steps K`` (a Karras grid
            of this many points, from σ_max; K steps take every (P/K)-th point); None = the training grid's N
            (at most 40).
        seed: seed of the per-step noise/index/dropout RNG (mixed with the step and the rank).
        net: the student network; None = the teacher's architecture (required without a teacher).
        param: EDM settings (σ_data, σ_min, σ_max) the consistency parameterisation uses; None = the teacher's
            (another one is an error), or ``EDM()`` without a teacher.
        guidance: classifier-free guidance scale of the teacher being distilled (CD only; 1 = unguided).
        init_from_teacher: start the student from the teacher's weights.
        student_dropout: dropout of the student copied from the teacher; 0 = none (the
            references' setting), null = the teacher's rate.
        optimizer: optimizer factory for the student (CM: RAdam 4e-4 on CIFAR-10).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant).
        lora: LoRA adapters instead of a full student, e.g. {rank: 8, alpha: 8, targets: [...]} (alpha = rank and
            per-network targets by default; ``lit_gen.nets.lora``); null = train every weight.
        teacher_zero3: under DeepSpeed ZeRO-3, ``partition`` or ``replicate`` the frozen teacher (see
            ``lit_gen.methods.distill``).
        guidance_stage_one: CD with guidance: the first N steps regress f_θ(x; σ, w) onto the guided teacher's x̂
            (Meng et al. 2023, stage one: the w-aware version of the student's start from the teacher), before the
            consistency loss, whose target network would otherwise learn w only through one teacher step. 0 = none.
    """

    method_name = "consistency"
    default_sampler = "consistency"
    default_steps = 1
    supports_zero3 = True  # the target update gathers through lit_gen.scale.zero3

    def __init__(
        self,
        teacher: str | None = None,
        training: str = "cd",
        num_scales: int = 18,
        curriculum_steps: int = 0,
        initial_scales: int = 11,
        rho: float = 7.0,
        teacher_solver: str = "heun",
        distance: str = "l2",
        target_momentum: float = 0.0,
        sigma_sampling: str = "uniform",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        weighting: str = "uniform",
        sampling_points: int | None = None,
        seed: int = 0,
        net: nn.Module | None = None,
        param: EDM | None = None,
        guidance: float | list[float] = 1.0,
        init_from_teacher: bool = True,
        student_dropout: float | None = 0.0,
        optimizer: OptimizerCallable = torch.optim.RAdam,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        guide_teacher: str | None = None,
        lora: LoRASpec | None = None,
        teacher_zero3: str = "partition",
        guidance_stage_one: int = 0,
    ) -> None:
        self._check_choices(training, teacher_solver, distance, sigma_sampling, weighting)
        check_teacher_zero3(teacher_zero3)
        if teacher is not None:
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
                decay_steps=decay_steps,
                teacher_zero3=teacher_zero3,
                guidance_stage_one=guidance_stage_one,
            )
            if training == "ct":
                self.teacher_net = None  # CT only starts from the teacher; it is not kept (nor saved)
        else:
            if training == "cd":
                raise LitGenError("consistency distillation needs a teacher: pass --model.init_args.teacher PATH")
            if net is None:
                raise LitGenError("consistency training without a teacher needs a network: set model.init_args.net")
            if guidance != 1.0 or guide_teacher is not None or guidance_stage_one:
                raise LitGenError("guidance applies to a distilled teacher; consistency training has none")
            self.init_without_teacher(
                net, param if param is not None else EDM(), optimizer, warmup_steps, decay_steps, teacher_zero3
            )
        # The teacher's EDM preconditioning steps the teacher; the student is the consistency function built on it.
        self.teacher_param = self.param
        self.param = ConsistencyParam.from_teacher(self.teacher_param)
        self.net.requires_grad_(True)  # a copy of the frozen teacher must train

        if num_scales < 2 or initial_scales < 2:
            raise LitGenError(f"num_scales and initial_scales must be at least 2, got {num_scales}, {initial_scales}")
        if curriculum_steps < 0 or (curriculum_steps and initial_scales > num_scales):
            raise LitGenError(
                f"the curriculum needs curriculum_steps >= 0 and initial_scales <= num_scales, got "
                f"{curriculum_steps}, {initial_scales}, {num_scales}"
            )
        if not 0.0 <= target_momentum < 1.0:
            raise LitGenError(f"target_momentum must be in [0, 1), got {target_momentum}")
        if not p_std > 0:
            raise LitGenError(f"p_std must be positive, got {p_std}")
        if sampling_points is not None and sampling_points < 1:
            raise LitGenError(f"sampling_points must be at least 1, got {sampling_points}")
        self.training_mode = training
        self.num_scales = int(num_scales)
        self.curriculum_steps = int(curriculum_steps)
        self.initial_scales = int(initial_scales)
        self.rho = float(rho)
        self.teacher_solver = teacher_solver
        self.distance_name = distance
        self.distance = get_distance(distance)
        self.target_momentum = float(target_momentum)
        self.sigma_sampling = sigma_sampling
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.weighting = weighting
        self.sampling_points = sampling_points
        self.seed = int(seed)
        # θ⁻: same mode (dropout) as the online net, never trained directly; saved under ``target_net.``.
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("num_scales_now", torch.tensor(self.scales_at(0), dtype=torch.long))
        adapt_method(self, lora, ("net",), {"target_net": "net"})  # LoRA: θ⁻ shares the frozen base

    @staticmethod
    def _check_choices(training: str, solver: str, distance: str, sigma_sampling: str, weighting: str) -> None:
        for name, value, table in (
            ("training", training, TRAINING_MODES),
            ("teacher_solver", solver, ODE_SOLVERS),
            ("distance", distance, tuple(DISTANCES)),
            ("sigma_sampling", sigma_sampling, SIGMA_SAMPLING),
            ("weighting", weighting, WEIGHTINGS),
        ):
            if value not in table:
                raise LitGenError(f"unknown {name} {value!r}; choose one of: {', '.join(table)}")

    # ------------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_denoise(self, x: Tensor, sigma: Tensor, label: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """The guided teacher's EDM x̂(x; σ) (``DistillationMethod.teacher_denoise`` with the teacher's own EDM
        preconditioning: the student's ``param`` is the consistency function), without gradient."""
        if self.teacher_net is None:
            raise LitGenError("this consistency model has no teacher (consistency training)")
        return super().teacher_denoise(x, sigma, label, w)

    # ------------------------------------------------------------------------------------------ discretisation
    def scales_at(self, step: int) -> int:
        """N at optimizer step ``step``: fixed ``num_scales``, or iCT's doubling curriculum (iCT eq. 8)."""
        if self.curriculum_steps <= 0:
            return self.num_scales
        return ict_num_scales(step, self.curriculum_steps, self.initial_scales - 1, self.num_scales - 1)

    def grid(self, n: int) -> Tensor:
        """The ascending σ boundaries σ_min … σ_max of an N-point Karras grid, float64 (CM Sec. 3)."""
        return consistency_grid(n, self.param.sigma_min, self.param.sigma_max, self.rho)

    def sample_indices(self, n_scales: int, batch: int, device: torch.device) -> Tensor:
        """n ∈ {0..N−2} per sample: uniform (CM Alg. 2) or iCT's discretised log-normal (iCT Sec. 3.5)."""
        if self.sigma_sampling == "uniform":
            return torch.randint(0, n_scales - 1, (batch,), device=device)
        probs = ict_sigma_probs(self.grid(n_scales), self.p_mean, self.p_std).to(device=device, dtype=torch.float32)
        return torch.multinomial(probs, batch, replacement=True)

    # ------------------------------------------------------------------------------------------------ training
    def step_seed(self) -> int:
        return (self.seed * 1_000_003 + int(self.global_step)) * 4099 + int(self.global_rank)

    def consistency_loss(self, y: Tensor, label: Tensor | None, n_scales: int) -> Tensor:
        """Per-sample λ(σ_n) d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)) (CM eq. 7 (CD) / eq. 10 (CT); iCT eq. 6).

        The target pass runs first, without gradient; the RNG state is restored before the online pass, so both
        networks see the same dropout masks (CM's code). Shape [B].
        """
        if self.in_stage_one():
            return self.stage_one_loss(y, label)
        dtype = torch.promote_types(y.dtype, torch.float32)
        y = y.to(dtype)
        grid = self.grid(n_scales).to(device=y.device, dtype=dtype)
        n = self.sample_indices(n_scales, y.shape[0], y.device)
        sigma, sigma_next = grid[n], grid[n + 1]
        z = torch.randn_like(y)
        x_next = y + sigma_next.view(-1, *([1] * (y.ndim - 1))) * z
        w = self.sample_guidance(y.shape[0], y.device)  # a w-conditioned student (LCM, Luo et al. 2023, Alg. 1)

        def teacher(x: Tensor, s: Tensor, lab: Tensor | None) -> Tensor:
            return self.teacher_denoise(x, s, lab, w)

        with torch.no_grad():
            if self.training_mode == "cd":
                x_hat = ode_step(teacher, x_next, sigma_next, sigma, label, self.teacher_solver)
            else:
                x_hat = y + sigma.view(-1, *([1] * (y.ndim - 1))) * z
            state = rng_state(y.device)
            target = self.param.denoise(bind_guidance(self.target_net, w), x_hat, sigma, label)
        set_rng_state(state, y.device)
        online = self.param.denoise(bind_guidance(self.net, w), x_next, sigma_next, label)
        weight = ict_loss_weight(sigma, sigma_next) if self.weighting == "ict" else torch.ones_like(sigma)
        return weight * self.distance(online, target)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.num_scales_now.fill_(self.scales_at(int(self.global_step)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        devices = [y.device] if y.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step_seed())
            loss = self.consistency_loss(y, label, int(self.num_scales_now)).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("train/num_scales", self.num_scales_now.float(), batch_size=y.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step: θ⁻ ← µθ⁻ + (1 − µ)θ. Here, not in ``on_train_batch_end``, so a checkpoint
        written at step k (callbacks see that hook first) holds the target after update k."""
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    @torch.no_grad()
    def update_target(self) -> None:
        """θ⁻ ← sg(µθ⁻ + (1 − µ)θ) (CM Alg. 2); buffers are copied. µ = 0 makes θ⁻ an exact copy of θ."""
        with gathered_copy(self.target_net, self.net):
            online = dict(self.net.named_parameters())
            for name, p in self.target_net.named_parameters():
                if self.target_momentum == 0.0:
                    p.copy_(online[name])
                else:
                    p.lerp_(online[name].to(p.dtype), 1.0 - self.target_momentum)
        online_buffers = dict(self.net.named_buffers())
        for name, b in self.target_net.named_buffers():
            b.copy_(online_buffers[name])

    # ------------------------------------------------------------------------------------- checkpoint section
    def sampling_grid(self) -> list[float]:
        """The σ points offered to K-step sampling: descending from σ_max, ending at 0 (the trailing 0 is not
        evaluated by the consistency sampler)."""
        points = self.sampling_points or min(int(self.num_scales_now), 40)
        if points == 1:
            return [self.param.sigma_max, 0.0]
        return [float(v) for v in self.grid(points).flip(0).tolist()] + [0.0]

    def describe(self) -> dict[str, Any]:
        """Adds the consistency sampler with the student's σ points (any K up to their number; the nearest points
        of an even spacing, ``grid_exact`` False) and the training settings."""
        section = super().describe()
        section["sampling"] = {
            "sampler": self.default_sampler,
            "steps": self.default_steps,
            "grid": self.sampling_grid(),
            "grid_exact": False,
        }
        section["consistency"] = {
            "training": self.training_mode,
            "num_scales": int(self.num_scales_now),
            "teacher_solver": self.teacher_solver if self.training_mode == "cd" else None,
            "distance": self.distance_name,
            "target_momentum": self.target_momentum,
        }
        if self.teacher_path is None:
            section.pop("teacher", None)
        return section
