"""MeanFlow: a one-step generator trained from data through the MeanFlow identity (no teacher).

Geng et al. 2025, "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447), Alg. 1; ALGORITHMS.md §11. The
maths lives in ``lit_gen.diffusion.meanflow``. Per optimizer step k:

    (r, t): logit-normal pair, t ≥ r, r = t for 1 − ``ratio_r_neq_t`` of the batch;  ε ~ N(0, I)
    z_t = (1 − t) x + t ε,  v = ε − x
    (CFG folded into training, MeanFlow Sec. 4.2 / eq. 13: ṽ = ω v + (1 − ω) u_θ(z_t, t, t | ∅) for the samples that
     keep their label; the rest are trained unconditional on v, and ṽ replaces v below)
    u_θ⁻, du/dt = JVP of u_θ⁻ along (v, 0, 1) at (z_t, r, t), no gradient
        (``tangent: predicted``, improved MeanFlow (iMF, Geng et al. 2025b, arXiv 2512.02012, Sec. 4.1): along
         (ṽ, 0, 1) with ṽ = u_θ⁻(z_t, t, t), the network's own marginal-velocity estimate; the target keeps v)
    u_tgt = v − (t − r) du/dt,   loss = sg(w) ‖u_θ(z_t, r, t) − sg(u_tgt)‖²,  w = 1/(‖Δ‖² + c)^p

The network needs a second time input (``aux_time: true`` on a lit_gen net: t − r through a zero-initialised
embedding). The JVP pass and the online pass are two evaluations here (the paper's code takes the primal from the
JVP); they share their dropout masks (the RNG state is restored before each). ``jvp: finite`` replaces the JVP by a
central difference. The checkpoint's sampling section records the ``meanflow`` sampler on a flow-time grid from
t = 1 to 0, so ``lit-gen sample --steps 1`` is x = z₁ − u_θ(z₁, 0, 1) and ``--steps 2`` goes 1 → 0.5 → 0.

State for an exact resume: the network and the optimizer; (r, t), ε and the label drop of step k come from an RNG
seeded by (``seed``, k, rank).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_gen.diffusion.broadcast import append_dims
from lit_gen.diffusion.meanflow import (
    JVP_MODES,
    TANGENTS,
    MeanFlow,
    average_velocity_tangent,
    flow_noise,
    meanflow_loss,
    meanflow_target,
)
from lit_gen.errors import LitGenError
from lit_gen.methods.base import GenerativeMethod
from lit_gen.methods.replay import eval_mode, rng_state, set_rng_state


class MeanFlowTraining(GenerativeMethod):
    """MeanFlow average-velocity model trained from data (Geng et al. 2025, Alg. 1); 1- and 2-NFE sampling.

    Args:
        net: the network, with a second time input (``aux_time: true``).
        param: the MeanFlow settings (``time_scale``); None = ``MeanFlow()``.
        p_mean: mean of the logit-normal (r, t) draws (MeanFlow ImageNet: −0.4).
        p_std: standard deviation of the logit-normal draws (MeanFlow: 1.0).
        ratio_r_neq_t: fraction of the batch with r ≠ t (MeanFlow default 25 %: 75 % plain flow matching).
        adaptive_power: p of the adaptive weight 1/(‖Δ‖² + c)^p (MeanFlow: 1; 0 = plain squared error).
        adaptive_const: c of the adaptive weight (MeanFlow: 1e-3).
        jvp: "autograd" (``torch.func.jvp``) or "finite" (central difference).
        jvp_eps: step ε of the finite difference in t (z moves by ε v).
        tangent: the JVP's z-tangent: "conditional" (ε − x, MeanFlow) or "predicted" (u_θ(z_t, t, t), improved
            MeanFlow Sec. 4.1: the target's only noise is then flow matching's own; one more forward pass).
        cfg_scale: ω of the guidance folded into training (1 = none; class-conditional nets only).
        label_dropout: probability that a sample trains unconditional (the NULL class; MeanFlow: 0.1).
        sampling_points: the flow-time grid offered to ``--steps K`` (K ≤ this; 2 steps go through t = 0.5).
        seed: seed of the per-step RNG (mixed with the step and the rank).
        optimizer: optimizer factory (MeanFlow: Adam, lr 1e-4, β = (0.9, 0.95)).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this step (0 = constant).
    """

    method_name = "meanflow"
    default_sampler = "meanflow"
    default_steps = 1

    def __init__(
        self,
        net: nn.Module,
        param: MeanFlow | None = None,
        p_mean: float = -0.4,
        p_std: float = 1.0,
        ratio_r_neq_t: float = 0.25,
        adaptive_power: float = 1.0,
        adaptive_const: float = 1e-3,
        jvp: str = "autograd",
        jvp_eps: float = 1e-3,
        tangent: str = "conditional",
        cfg_scale: float = 1.0,
        label_dropout: float = 0.1,
        sampling_points: int = 16,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        warmup_steps: int = 0,
        decay_steps: int = 0,
    ) -> None:
        if getattr(net, "map_aux", None) is None:
            raise LitGenError(
                f"MeanFlow needs a network with a second time input: set aux_time: true in the net's init_args "
                f"({type(net).__name__})"
            )
        if param is not None and not isinstance(param, MeanFlow):
            raise LitGenError(f"MeanFlow trains in flow coordinates: model.param must be a MeanFlow, got {param!r}")
        if jvp not in JVP_MODES:
            raise LitGenError(f"unknown jvp {jvp!r}; choose one of: {', '.join(JVP_MODES)}")
        if tangent not in TANGENTS:
            raise LitGenError(f"unknown tangent {tangent!r}; choose one of: {', '.join(TANGENTS)}")
        if not 0.0 <= ratio_r_neq_t <= 1.0 or not 0.0 <= label_dropout < 1.0:
            raise LitGenError(
                f"ratio_r_neq_t must be in [0, 1] and label_dropout in [0, 1), got {ratio_r_neq_t}, {label_dropout}"
            )
        if not p_std > 0 or adaptive_power < 0 or not adaptive_const > 0 or not jvp_eps > 0 or sampling_points < 1:
            raise LitGenError(
                "need p_std > 0, adaptive_power >= 0, adaptive_const > 0, jvp_eps > 0 and sampling_points >= 1"
            )
        super().__init__(
            net=net,
            param=param if param is not None else MeanFlow(),
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
        )
        if cfg_scale != 1.0 and self.num_classes == 0:
            raise LitGenError(f"cfg_scale {cfg_scale} needs a class-conditional network (num_classes > 0)")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.ratio_r_neq_t = float(ratio_r_neq_t)
        self.adaptive_power, self.adaptive_const = float(adaptive_power), float(adaptive_const)
        self.jvp_mode, self.jvp_eps = jvp, float(jvp_eps)
        self.tangent = tangent
        self.cfg_scale, self.label_dropout = float(cfg_scale), float(label_dropout)
        self.sampling_points = int(sampling_points)
        self.seed = int(seed)

    # ------------------------------------------------------------------------------------------------ training
    def step_seed(self) -> int:
        return (self.seed * 1_000_003 + int(self.global_step)) * 4099 + int(self.global_rank)

    def guided_velocity(self, z: Tensor, t: Tensor, v: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(ṽ, training labels): the label drop to the NULL class (prob ``label_dropout``) and, with ω != 1, the
        velocity with guidance folded in, ω v + (1 − ω) u_θ(z, t, t | ∅) for the kept labels (MeanFlow eq. 13)."""
        if label is None or self.num_classes == 0:
            return v, None
        dropped = torch.rand(label.shape[0], device=label.device) < self.label_dropout
        null = torch.full_like(label, self.num_classes)
        train_label = torch.where(dropped, null, label)
        if self.cfg_scale == 1.0:
            return v, train_label
        with torch.no_grad(), eval_mode(self.net):
            u_uncond = self.param.u(self.net, z, t, t, null).to(v.dtype)
        guided = self.cfg_scale * v + (1 - self.cfg_scale) * u_uncond
        return torch.where(append_dims(dropped, v.ndim), v, guided), train_label

    def meanflow_loss(self, x: Tensor, label: Tensor | None) -> Tensor:
        """Per-sample MeanFlow loss (MeanFlow Alg. 1, eqs. 9–10 with the adaptive weight). Shape [B]."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        r, t = self.param.sample_times(
            x.shape[0], self.p_mean, self.p_std, self.ratio_r_neq_t, device=x.device, dtype=dtype
        )
        eps = torch.randn_like(x)
        z = flow_noise(x, eps, t)
        v, train_label = self.guided_velocity(z, t, eps - x, label)
        state = rng_state(x.device)
        fn = self.param.bind(self.net, train_label)

        def shared(zz: Tensor, rr: Tensor, tt: Tensor) -> Tensor:
            set_rng_state(state, x.device)  # every evaluation draws the online pass's dropout masks
            return fn(zz, rr, tt)

        with torch.no_grad():
            # iMF Sec. 4.1: the boundary condition u(z, t, t) = v(z, t) gives the marginal-velocity tangent.
            direction = shared(z, t, t).to(dtype) if self.tangent == "predicted" else v
            _, du_dt = average_velocity_tangent(shared, z, r, t, direction, self.jvp_mode, self.jvp_eps)
            u_tgt = meanflow_target(v, du_dt.to(dtype), r, t)
        set_rng_state(state, x.device)
        u = self.param.u(self.net, z, r, t, train_label).to(dtype)
        return meanflow_loss(u, u_tgt, self.adaptive_power, self.adaptive_const)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        label = batch.get("label") if self.num_classes else None
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.step_seed())
            loss = self.meanflow_loss(x, label).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    # ------------------------------------------------------------------------------------- checkpoint section
    def describe(self) -> dict[str, Any]:
        """Adds the meanflow sampler on the flow-time grid 1, …, 0 (``sampling_points`` jumps; any ``--steps K`` up
        to it takes the nearest points of an even spacing) and the training settings."""
        section = super().describe()
        grid = torch.linspace(1.0, 0.0, self.sampling_points + 1, dtype=torch.float64).tolist()
        section["sampling"] = {"sampler": self.default_sampler, "steps": 1, "grid": grid, "grid_exact": False}
        section["meanflow"] = {
            "ratio_r_neq_t": self.ratio_r_neq_t,
            "jvp": self.jvp_mode,
            "tangent": self.tangent,
            "cfg_scale": self.cfg_scale,
            "adaptive_power": self.adaptive_power,
        }
        return section
