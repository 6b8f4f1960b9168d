"""sCM: continuous-time consistency distillation (sCD) and training (sCT) in TrigFlow.

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (arXiv 2410.11081),
Alg. 1; ALGORITHMS.md §10. The maths lives in ``lit_gen.diffusion.trigflow``. Per optimizer step k:

    t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²);  z ~ N(0, σ_d² I);  x_t = cos t · y + sin t · z
    dx_t/dt = σ_d F_teacher(x_t/σ_d, t)  (sCD: the teacher's PF-ODE velocity (cos t x_t − x̂)/sin t)
            = cos t · z − sin t · y      (sCT: the conditional velocity of the path)
    F_θ⁻, cos t sin t · dF_θ⁻/dt = JVP of F_θ⁻(·/σ_d, ·) at (x_t, t) along cos t sin t · (dx_t/dt, 1), no gradient
    g = −cos² t (σ_d F_θ⁻ − dx_t/dt) − r_k cos t sin t (x_t + σ_d dF_θ⁻/dt),  g ← g/(‖g‖ + 0.1)
    loss = e^{−w_φ(t)} · mean((F_θ − F_θ⁻ − g)²) + w_φ(t)       (w_φ: small MLP on t, trained jointly)

with the tangent warm-up r_k = min(1, k / tangent_warmup_steps). θ⁻ = sg(θ): the same network, no EMA target (sCM
Sec. 4); the inference EMA is ``callbacks.ema.EMA`` on ``net``.

sCD: the teacher is any lit_gen teacher (its x̂ in EDM coordinates gives the velocity, classifier-free guided when
``guidance`` != 1). An EDM teacher is converted to TrigFlow exactly (``TrigFlow.from_teacher``, time conditioning
"edm": F = −F_EDM at c_noise = ln(σ_d tan t)/4), so the student starts as the teacher's denoiser, f_θ = x̂_teacher.
The student trains with dropout 0 (a copied teacher architecture is rebuilt without its dropout; an explicit
student with dropout is refused) and the tangent pass runs in eval mode, as every network entering a target does
(ALGORITHMS.md §7). sCT (no teacher; a teacher path only initialises the student) may keep dropout: the tangent pass
then shares the online pass's dropout masks (the RNG state is restored before each evaluation).

The JVP is ``torch.func.jvp`` (``jvp: autograd``) or a central finite difference (``jvp: finite``, FastGen's
workaround for fused attention and sharded parameters, where forward-mode AD is unavailable). The checkpoint's
sampling section records the consistency sampler (CM Alg. 1) on the EDM σ points [σ_max, σ_d tan(1.1), 0], so
``lit-gen sample --steps 1`` is f at t_max and ``--steps 2`` re-noises to the paper's intermediate t = 1.1.

State for an exact resume: the network, the adaptive weight MLP (``weight_net.``), the optimizer; the noise and t of
step k come from an RNG seeded by (``seed``, k, rank), and r_k is a function of k.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.diffusion import EDM, VP, guide
from lit_gen.diffusion.trigflow import (
    JVP_MODES,
    TrigFlow,
    jvp_time_derivative,
    scm_loss,
    scm_tangent,
    trigflow_noise,
)
from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod
from lit_gen.methods.replay import eval_mode, rng_state, set_rng_state
from lit_gen.nets.lora import LoRASpec, adapt_method
from lit_gen.nets.weighting import AdaptiveWeight
from lit_gen.spec import build, describe

TRAINING_MODES = ("scd", "sct")


def without_dropout(net: nn.Module) -> nn.Module:
    """The same network rebuilt with dropout 0 and the same weights (a lit_gen net describes itself)."""
    spec = describe(net)
    if not float(spec["init_args"].get("dropout", 0.0) or 0.0):
        return net
    rebuilt = build({**spec, "init_args": {**spec["init_args"], "dropout": 0.0}})
    rebuilt.load_state_dict(net.state_dict())
    return rebuilt.to(next(net.parameters()).device).train(net.training)


class SCM(DistillationMethod):
    """Continuous-time consistency model in TrigFlow: sCD from a frozen teacher, or sCT without one (sCM Alg. 1).

    Args:
        teacher: path to the teacher (``.ckpt`` or exported ``.safetensors``). Needed for sCD; for sCT it only
            initialises the student (null = train ``net`` from its random init).
        training: "scd" (the teacher's PF-ODE velocity) or "sct" (the path's velocity cos t · z − sin t · x₀).
        jvp: how dF_θ⁻/dt is computed: "autograd" (``torch.func.jvp``) or "finite" (central difference).
        jvp_eps: step ε of the finite difference, in units of the scaled tangent (t moves by ε cos t sin t).
        p_mean: P_mean of the t proposal, tan t = e^τ/σ_d, τ ~ N(P_mean, P_std²) (sCM CIFAR-10: −1.0).
        p_std: P_std of the t proposal (sCM CIFAR-10: 1.4).
        tangent_warmup_steps: r rises linearly from 0 to 1 over this many steps (sCM: 10k; 0 = no warm-up).
        tangent_norm: c of the tangent normalisation g/(‖g‖ + c) (sCM: 0.1); null = no normalisation.
        adaptive_weight: learn w_φ(t) (sCM Sec. 4.2); false = unit weights.
        weight_channels: width of the w_φ MLP.
        mid_t: intermediate TrigFlow time of 2-step sampling (sCM: 1.1).
        seed: seed of the per-step noise/t/dropout RNG (mixed with the step and the rank).
        net: the student network; None = the teacher's architecture (required without a teacher).
        param: the TrigFlow settings; None = converted from the EDM teacher (``TrigFlow.from_teacher``), or
            ``TrigFlow()`` without a teacher.
        guidance: classifier-free guidance scale of the teacher being distilled (sCD only; 1 = unguided).
        init_from_teacher: start the student from the teacher's weights (needs an EDM teacher and the "edm" time
            conditioning: the conversion is then exact).
        optimizer: optimizer factory for the student and w_φ (sCM: RAdam / Adam, lr 1e-4 on CIFAR-10).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant).
        lora: LoRA adapters instead of a full student, e.g. {rank: 8, alpha: 8, targets: [...]} (alpha = rank and
            per-network targets by default; ``lit_gen.nets.lora``); null = train every weight.
    """

    method_name = "scm"
    # Not run under ZeRO-3 yet: its tangent is a torch.func.jvp through the student and the teacher, and ZeRO-3's
    # gathering hooks swap parameter storage inside that transform (untested) -> refused with one line (base.setup).
    supports_zero3 = False
    default_sampler = "consistency"
    default_steps = 1

    def __init__(
        self,
        teacher: str | None = None,
        training: str = "scd",
        jvp: str = "autograd",
        jvp_eps: float = 1e-3,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        tangent_warmup_steps: int = 10000,
        tangent_norm: float | None = 0.1,
        adaptive_weight: bool = True,
        weight_channels: int = 128,
        mid_t: float = 1.1,
        seed: int = 0,
        net: nn.Module | None = None,
        param: TrigFlow | None = None,
        guidance: float = 1.0,
        init_from_teacher: bool = True,
        optimizer: OptimizerCallable = torch.optim.RAdam,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        lora: LoRASpec | None = None,
    ) -> None:
        for name, value, table in (("training", training, TRAINING_MODES), ("jvp", jvp, JVP_MODES)):
            if value not in table:
                raise LitGenError(f"unknown {name} {value!r}; choose one of: {', '.join(table)}")
        if not p_std > 0 or not jvp_eps > 0 or tangent_warmup_steps < 0:
            raise LitGenError(
                f"need p_std > 0, jvp_eps > 0 and tangent_warmup_steps >= 0, got {p_std}, {jvp_eps}, "
                f"{tangent_warmup_steps}"
            )
        if tangent_norm is not None and not tangent_norm > 0:
            raise LitGenError(f"tangent_norm must be positive (or null for none), got {tangent_norm}")
        explicit_net = net is not None
        if teacher is not None:
            super().__init__(
                teacher=teacher,
                net=net,
                param=None,  # the teacher's; the student's TrigFlow settings are checked below
                guidance=guidance,
                init_from_teacher=init_from_teacher,
                optimizer=optimizer,
                warmup_steps=warmup_steps,
                decay_steps=decay_steps,
            )
            if training == "sct":
                self.teacher_net = None  # sCT only starts from the teacher; it is not kept (nor saved)
        else:
            if training == "scd":
                raise LitGenError("sCD needs a teacher: pass --model.init_args.teacher PATH (or training: sct)")
            if net is None:
                raise LitGenError("sCT without a teacher needs a network: set model.init_args.net")
            if guidance != 1.0:
                raise LitGenError("guidance applies to a distilled teacher; sCT has none")
            # EDM() is replaced by the TrigFlow settings below
            self.init_without_teacher(net, EDM(), optimizer, warmup_steps, decay_steps)
        self.teacher_param: EDM | VP | None = self.param if teacher is not None else None
        self.param = self._trigflow(param, teacher, init_from_teacher)
        if training == "scd" and float(self.net.init_args.get("dropout", 0.0) or 0.0) > 0:
            if explicit_net:
                raise LitGenError(
                    f"sCD students train with dropout 0 (ALGORITHMS.md §7); the recipe's network has dropout "
                    f"{self.net.init_args['dropout']}: set it to 0 or leave model.net out (the teacher's, without it)"
                )
            self.net = without_dropout(self.net)
        self.net.requires_grad_(True)
        if not 0 < mid_t < self.param.t_max:
            raise LitGenError(f"mid_t must be in (0, {self.param.t_max:.4f}), got {mid_t}")
        self.training_mode = training
        self.jvp_mode = jvp
        self.jvp_eps = float(jvp_eps)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.tangent_warmup_steps = int(tangent_warmup_steps)
        self.tangent_norm = None if tangent_norm is None else float(tangent_norm)
        self.mid_t = float(mid_t)
        self.seed = int(seed)
        self.weight_net = AdaptiveWeight(weight_channels) if adaptive_weight else None
        adapt_method(self, lora, ("net",))  # LoRA: the student as adapters over the teacher (lit_gen.nets.lora)

    def _trigflow(self, param: TrigFlow | None, teacher: str | None, init_from_teacher: bool) -> TrigFlow:
        """The student's TrigFlow settings: the EDM teacher's, converted exactly, unless the recipe names others."""
        teacher_param = self.teacher_param
        exact = getattr(teacher_param, "kind", "") == "edm"
        if param is None:
            if teacher_param is None:
                return TrigFlow()
            if not exact:
                raise LitGenError(
                    f"the teacher {teacher} uses {describe(teacher_param)['class_path']}, which has no exact TrigFlow "
                    "form: set model.param (a lit_gen.diffusion.trigflow.TrigFlow) and model.init_from_teacher false"
                )
            return TrigFlow.from_teacher(teacher_param)
        if teacher is not None and init_from_teacher:
            if not exact or param.time_conditioning != "edm" or param.sigma_data != teacher_param.sigma_data:  # type: ignore[union-attr]
                raise LitGenError(
                    "a student started from the teacher's weights needs an EDM teacher and TrigFlow(time_conditioning="
                    f"'edm', sigma_data={getattr(teacher_param, 'sigma_data', '?')}); got {param!r} "
                    "(or set model.init_from_teacher false)"
                )
        return param

    # ------------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_denoise(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """The (CFG-guided) teacher's x̂(x; σ) in EDM coordinates with its own parameterisation, without gradient."""
        if self.teacher_net is None or self.teacher_param is None:
            raise LitGenError("this sCM model has no teacher (sCT)")
        if self.guidance == 1.0 or label is None:
            return self.teacher_param.denoise(self.teacher_net, x, sigma, label)
        null = torch.full_like(label, self.teacher_num_classes)
        both = self.teacher_param.denoise(
            self.teacher_net, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null])
        )
        cond, uncond = both.chunk(2)
        return guide(cond, uncond, self.guidance)

    def trainable_parameters(self) -> Any:
        """The student and the adaptive weight w_φ, in one optimizer (DeepSpeed takes one)."""
        extra = self.weight_net.parameters() if self.weight_net is not None else ()
        return itertools.chain((p for p in self.net.parameters() if p.requires_grad), extra)

    # ------------------------------------------------------------------------------------------------ training
    def step_seed(self) -> int:
        return (self.seed * 1_000_003 + int(self.global_step)) * 4099 + int(self.global_rank)

    def tangent_warmup(self, step: int) -> float:
        """r_k = min(1, k / tangent_warmup_steps) (sCM Sec. 4.2, "tangent warmup")."""
        return 1.0 if self.tangent_warmup_steps <= 0 else min(1.0, step / self.tangent_warmup_steps)

    def velocity(self, y: Tensor, z: Tensor, x_t: Tensor, t: Tensor, label: Tensor | None) -> Tensor:
        """dx_t/dt: the teacher's PF-ODE velocity (sCD) or the path's cos t · z − sin t · y (sCT)."""
        if self.training_mode == "sct":
            tb = t.view(-1, *([1] * (y.ndim - 1)))
            return torch.cos(tb) * z - torch.sin(tb) * y
        x0_hat = self.param.denoised_at(self.teacher_denoise, x_t, t, label)
        return self.param.velocity_from_denoised(x_t, t, x0_hat.to(x_t.dtype))

    def tangent_pass(self, x_t: Tensor, t: Tensor, dxt_dt: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor]:
        """(F_θ⁻, cos t sin t · dF_θ⁻/dt) without gradient: the JVP along the scaled tangent (sCM Alg. 1).

        The RNG state is restored before every evaluation (the finite difference makes three), so each one, and the
        online pass after it, draws the same dropout masks."""
        sigma_d = self.param.sigma_data
        cs = torch.cos(t) * torch.sin(t)
        state = rng_state(x_t.device)
        trig = self.param.bind(self.net, label)

        def fn(x_in: Tensor, tt: Tensor) -> Tensor:
            set_rng_state(state, x_t.device)
            return trig(x_in, tt)

        mode = eval_mode(self.net) if self.training_mode == "scd" else contextlib.nullcontext()
        with torch.no_grad(), mode:
            dx_in = cs.view(-1, *([1] * (x_t.ndim - 1))) * dxt_dt / sigma_d
            F_minus, dF = jvp_time_derivative(fn, x_t / sigma_d, t, dx_in, cs, self.jvp_mode, self.jvp_eps)
        set_rng_state(state, x_t.device)
        return F_minus.detach(), dF.detach()

    def scm_loss(self, y: Tensor, label: Tensor | None) -> Tensor:
        """Per-sample sCM loss (sCM Alg. 1 / eq. 8 with the adaptive weight). Shape [B]."""
        dtype = torch.promote_types(y.dtype, torch.float32)
        y = y.to(dtype)
        sigma_d = self.param.sigma_data
        t = self.param.sample_t(y.shape[0], self.p_mean, self.p_std, device=y.device, dtype=dtype)
        z = torch.randn_like(y) * sigma_d
        x_t = trigflow_noise(y, z, t)
        with torch.no_grad():
            dxt_dt = self.velocity(y, z, x_t, t, label)
        F_minus, dF = self.tangent_pass(x_t, t, dxt_dt, label)
        F_online = self.param.F(self.net, x_t / sigma_d, t, label).to(dtype)
        r = self.tangent_warmup(int(self.global_step))
        g = scm_tangent(F_minus.to(dtype), dF.to(dtype), x_t, dxt_dt, t, sigma_d, r, self.tangent_norm)
        logvar = self.weight_net(self.param.c_noise(t)) if self.weight_net is not None else None
        return scm_loss(F_online, F_minus.to(dtype), g, logvar)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        devices = [y.device] if y.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step_seed())
            loss = self.scm_loss(y, label).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("train/tangent_warmup", self.tangent_warmup(int(self.global_step)), batch_size=y.shape[0])
        return loss

    # ------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        """Adds the consistency sampler on [σ_max, σ_d tan(mid_t), 0] (``--steps`` 1 or 2) and the settings."""
        section = super().describe()
        section["sampling"] = {
            "sampler": self.default_sampler,
            "steps": self.default_steps,
            "grid": self.param.sampling_grid(self.mid_t),
            "grid_exact": True,
        }
        section["scm"] = {
            "training": self.training_mode,
            "jvp": self.jvp_mode,
            "t_max": self.param.t_max,
            "mid_t": self.mid_t,
            "tangent_warmup_steps": self.tangent_warmup_steps,
            "adaptive_weight": self.weight_net is not None,
        }
        if self.teacher_path is None:
            section.pop("teacher", None)
        return section
