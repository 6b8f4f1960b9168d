"""f-distill: a one-step student by f-divergence distribution matching (Xu, Nie & Vahdat 2025, "One-step Diffusion
Models with f-Divergence Distribution Matching"), with DMD/VSD (Yin et al. 2024, Wang et al. 2023) as its
reverse-KL case and DMD2's GAN head (Yin et al. 2024b) — ALGORITHMS.md §5.

Networks (all started from the teacher's weights except the head):
- generator G_θ(z) = D_θ(σ_max z; σ_max): the student denoiser evaluated once at the top noise level (``net``);
- fake score D_φ (``fake_net``): denoising score matching on sg(G_θ(z)), so it tracks the student's density q;
  trained with dropout ``student_dropout`` (0 by default) and evaluated in eval mode inside the DM term, so that
  fake = teacher gives exactly zero DM gradient (FastGen puts it in eval mode for the student update);
- discriminator ℓ_ψ (``disc``): one position-aware head per feature level of the frozen teacher (or, DMD2's choice,
  ``disc_features: fake_score``, of the trainable fake score) at noisy samples, logits summed; logistic loss on
  noisy real vs noisy generated samples, so ℓ → ln r with r = p_σ/q_σ (teacher over student density);
  optional R1 (exact gradient penalty) or approximate R1 (Lin et al. 2024);
- frozen teacher D_T (``teacher_net``), optionally classifier-free guided or autoguided (``guide_teacher``).

A w-conditioned generator (``guidance: [w_min, w_max]``, Meng et al. 2023) draws w per sample: G_θ(z, w), the teacher
guided at w in the DM term, and the fake score conditioned on w too (it must track q_w, the student's density at that
w; it gets the same zero-initialised w embedding). A head on the teacher's features does not see w (it estimates
the ratio against the w-mixture of generated samples); ``disc_features: fake_score`` gives it w.

Noise levels: one distribution (``noise``: DMD2's uniform position on the Karras ramp in [t_min, t_max], or EDM's
log-normal) is shared by the fake score's DSM loss, the DM loss and the discriminator (DMD2 / FastGen draw all three
from one distribution; a fake score trained on other levels than the DM term reads it at is inaccurate exactly
there). The GAN terms also get their own range (``gan_t_min``/``gan_t_max``, low σ by default, where real and
generated samples differ most): a fraction ``gan_fraction`` of the discriminator's samples is drawn there, and the
generator's GAN loss counts only the DM samples whose σ lies in it.

Generator gradient (f-distill eq. 8 with DMD's normalisation, DMD2 code):
    x_σ = G_θ(z) + σ ε,   g = ĥ(r(x_σ)) · (D_φ(x_σ) − D_T(x_σ)) / mean|G_θ(z) − D_T(x_σ)|,
    L_DM = ½ mean((G_θ(z) − sg(G_θ(z) − g))²)        (so ∂L_DM/∂G_θ(z) ∝ g),
with h = f''(r) r² from ``divergences.py`` normalised to batch mean 1 (ĥ). Reverse-KL has h ≡ 1: L_DM is then
exactly DMD's loss. The GAN term adds λ_GAN · softplus(−ℓ_ψ(x_σ)) (head weights detached).

Update scheme (one optimizer, so it also runs under Lightning's DeepSpeed strategy, which allows only one):
- one optimizer over three parameter groups named ``generator``, ``fake_score``, ``discriminator``; the learning
  rate of the last two is the recipe's lr times ``fake_lr_scale`` / ``disc_lr_scale``;
- every optimizer step trains the fake score and the discriminator (DMD2's schedule); the generator is trained on
  steps k with k % update_ratio == 0 (k = optimizer steps taken, a checkpointed buffer). One loss is summed per
  step; the cross-terms are detached (critics see sg(G_θ(z)); the generator's DM term uses D_φ without gradient
  and its GAN term calls the head with detached weights), so each group's gradient is exactly its own loss's;
- on critic-only steps the generator still gets a gradient — exactly zero (a 0·Σθ term) — so DDP's reducer sees
  every parameter (no ``find_unused_parameters``) and ZeRO's flat gradient buffers are filled;
- the optimizer step itself skips the inactive group: after the backward (inside the closure, before the update)
  its ``params`` list is emptied and restored after the step. Torch optimizers — and DeepSpeed ZeRO-1/2, which
  step the torch optimizer group by group over the same group dicts — then leave those parameters *and their
  optimizer state* untouched: no Adam momentum drift, no weight decay, no step-count advance. Each network
  therefore sees exactly the Adam trajectory of a private optimizer stepped only on its own updates (the
  semantics of DMD2's two optimizers), measured in tests/test_fdistill_multiprocess.py under DDP and DeepSpeed;
- gradient clipping (``trainer.gradient_clip_val``) acts on the global norm, to which the zero gradients add 0.
  The learning-rate schedule counts optimizer steps (all of them).

The student samples in one step: ``describe()["sampling"]`` = Euler on the grid [σ_max, 0], which is exactly
x = D_θ(σ_max z; σ_max). A module-owned EMA of the generator (``ema_halflife_steps`` > 0, ``net_ema``, exported via
``ema_prefix``) avoids the EMA callback, which would deep-copy the teacher, fake score and head too.

DeepSpeed ZeRO-3 (issue 20): the three groups stay in one optimizer; ZeRO-3's optimizer sets each torch group's
``params`` itself, so the inactive group is skipped by ``lit_gen.scale.zero3.skip_param_groups`` instead (same
semantics: weights and Adam state untouched). Its gradient buffers keep the previous step's values for parameters
that get no gradient, so on critic steps the generator's exact-zero gradient comes from 0·G_θ(z) (a generator
backward) rather than from 0·Σθ (which needs the whole, ungathered parameters). The generator's "detached" views of
the head and of a fake-score feature net switch ``requires_grad`` off for the call instead of ``functional_call``
with detached weights (which would bypass ZeRO-3's gathering); the EMA update runs in
``lit_gen.scale.zero3.gathered_copy``. The teacher is partitioned or replicated by ``teacher_zero3``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_gen.diffusion import EDM, VP, append_dims
from lit_gen.diffusion.guidance import bind_guidance
from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod, trainable_copy, with_guidance_embed
from lit_gen.methods.divergences import (
    DIVERGENCES,
    density_ratio,
    get_divergence,
    normalized_weights,
    ratio_bin_means,
)
from lit_gen.methods.replay import eval_mode
from lit_gen.nets.discriminator import MultiLevelDiscriminator
from lit_gen.nets.lora import LoRASpec, adapt_method
from lit_gen.phema import gamma_from_sigma_rel, power_beta
from lit_gen.scale.zero3 import gathered_copy, partitioned, skip_param_groups

GROUPS = ("generator", "fake_score", "discriminator")


# --------------------------------------------------------------------------------------------- the losses, as math
def ramp_sigma(t: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """σ(t) = (σ_min^(1/ρ) + t (σ_max^(1/ρ) − σ_min^(1/ρ)))^ρ, t ∈ [0, 1]: the Karras ramp (EDM eq. 5) as a
    continuous map. DMD2 draws its noise level uniformly among the ramp's points between 2 % and 98 % (the EDM
    experiments' ``min/max_step_percent``); t ~ U[t_min, t_max] here is the continuous version."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def ramp_position(sigma: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The inverse of ``ramp_sigma``: t(σ) = (σ^(1/ρ) − σ_min^(1/ρ)) / (σ_max^(1/ρ) − σ_min^(1/ρ))."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (sigma ** (1 / rho) - lo) / (hi - lo)


NOISE_DISTRIBUTIONS = ("ramp", "lognormal")


def x_space_weight(param: EDM | VP, sigma: Tensor) -> Tensor:
    """The teacher loss's weight on ‖x̂ − y‖² at VE noise level σ, so the fake score's DSM loss at a given σ is the
    teacher's own loss there: EDM λ(σ) = (σ² + σ_d²)/(σ σ_d)² (EDM Table 1; DMD2's fake-score weight
    SNR + 1/σ_d²); VP with SNR = 1/σ²: truncated SNR max(SNR, 1), v: 1 + SNR, ε: SNR (Salimans & Ho 2022, Sec. 4)."""
    if isinstance(param, VP):
        snr = sigma.pow(-2)
        return {"snr_trunc": snr.clamp_min(1.0), "v": 1 + snr, "eps": snr}[param.loss_weighting]
    return param.loss_weight(sigma)


def dsm_loss_at(
    param: EDM | VP, net: nn.Module, y: Tensor, sigma: Tensor, label: Tensor | None, noise: Tensor | None = None
) -> Tensor:
    """Per-sample denoising score matching w(σ) ‖D(y + σ n; σ) − y‖² (mean over non-batch dims) at given σ [B]."""
    n = torch.randn_like(y) if noise is None else noise
    d = param.denoise(net, y + append_dims(sigma, y.ndim).to(y.dtype) * n, sigma, label)
    per_elem = append_dims(x_space_weight(param, sigma), y.ndim) * (d.to(sigma.dtype) - y.to(sigma.dtype)) ** 2
    return per_elem.reshape(y.shape[0], -1).mean(dim=1)


def distribution_matching_loss(
    x0: Tensor, x_teacher: Tensor, x_fake: Tensor, weight: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """L = ½ mean((x0 − sg(x0 − g))²), g = w · (x̂_fake − x̂_teacher) / mean|x0 − x̂_teacher| (per sample).

    DMD (Yin et al. 2024) eq. 7 with its normalisation (DMD2 code, ``compute_distribution_matching_loss``); the
    per-sample weight w = ĥ(r) makes it f-distill's gradient (eq. 8). ∂L/∂x0 = g / x0.numel(). The weights and g
    are computed in float32 or wider and without gradient; only ``x0`` carries one.
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        x0d, teacher, fake = x0.detach().to(dtype), x_teacher.to(dtype), x_fake.to(dtype)
        norm = (x0d - teacher).abs().mean(dim=dims, keepdim=True) + eps
        grad = (fake - teacher) / norm
        if weight is not None:
            grad = grad * append_dims(weight.to(dtype), x0.ndim)
        target = torch.nan_to_num(x0d - grad).to(x0.dtype)
    return 0.5 * F.mse_loss(x0, target)


def gan_generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating GAN loss for the generator, mean softplus(−ℓ(fake)) (DMD2 eq. 4 / Goodfellow et al. 2014)."""
    return F.softplus(-logit_fake.float()).mean()


def gan_discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """Logistic loss mean softplus(ℓ(fake)) + mean softplus(−ℓ(real)); its minimiser is ℓ* = ln(p/q) (DMD2 eq. 5)."""
    return F.softplus(logit_fake.float()).mean() + F.softplus(-logit_real.float()).mean()


@contextmanager
def frozen_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Calls of ``module`` inside the block record no gradient for its weights (gradient still reaches the inputs):
    the weights are used as constants, as ``functional_call`` with detached weights would — and ZeRO-3's gathering
    hooks still see the real parameters."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)


def feature_levels(net: nn.Module, x_in: Tensor, c_noise: Tensor, label: Tensor | None) -> list[Tensor]:
    """``net.feature_levels`` (every resolution) or, for a net that has only ``features``, that one level."""
    if hasattr(net, "feature_levels"):
        return list(net.feature_levels(x_in, c_noise, label))
    return [net.features(x_in, c_noise, label)]


class _CaptureInput:
    """A stand-in network for ``param.denoise``: records the preconditioned input (x_in, c_noise, label) that the
    real network would get and returns F = 0. Lets the teacher's features be computed for any parameterisation."""

    args: tuple[Tensor, Tensor, Tensor | None]

    def __call__(self, x_in: Tensor, c_noise: Tensor, label: Tensor | None) -> Tensor:
        self.args = (x_in, c_noise, label)
        return torch.zeros_like(x_in)


# ------------------------------------------------------------------------------------------------ the module
class FDistill(DistillationMethod):
    """One-step generator distilled from a diffusion teacher by f-divergence distribution matching.

    Args:
        teacher: path to the teacher (``.ckpt`` from ``lit-gen fit`` or an exported ``.safetensors``).
        net: the generator network; None = the teacher's architecture.
        param: the parameterisation; None = the teacher's.
        guidance: guidance scale of the distilled teacher (1 = unguided), or [w_min, w_max] for a w-conditioned
            generator (Meng et al. 2023).
        guide_teacher: a guiding model for autoguidance of the teacher (Karras et al. 2024).
        guidance_sigma_max: the DM term's target is guided only at σ ≤ this (above it: w = 1, the conditional
            teacher); 0 = at every σ. Classifier-free guidance extrapolates the class means at large σ, where no
            distribution's denoiser (the fake score) can follow it: on digits at w = 4 the CFG x̂ at σ ≫ σ_data sits
            0.99 (RMS) from the class means of the teacher's own w = 4 samples, which moved only 0.14 from w = 1,
            and the w-conditioned one-step generator collapses there (benchmarks/RESULTS.md, issue 18). A limited
            guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval") avoids it.
        init_from_teacher: start generator and fake score from the teacher's weights.
        student_dropout: dropout of the student (and fake score) copied from the teacher; 0 = none (the
            references' setting), null = the teacher's rate.
        divergence: one of ``rkl`` (reverse KL = DMD/VSD), ``softened_rkl``, ``js``, ``hellinger``, ``fkl``,
            ``jeffreys``, ``alpha`` (see ``lit_gen.methods.divergences``).
        alpha: α of the ``alpha`` divergence (h = r^α).
        gan_weight: λ_GAN, weight of the generator's GAN loss; 0 with ``rkl`` is plain DMD (no discriminator).
        r1_weight: weight of the R1 penalty on the discriminator's real samples (0 = off).
        r1_kind: ``approx`` — approximate R1 ‖ℓ(x) − ℓ(x + α n)‖² (Lin et al. 2024, DMD2/FastGen's ``gan_r1_reg``);
            ``grad`` — R1 proper, ‖∇_x ℓ(x)‖² at the noisy real sample (Mescheder et al. 2018; a double backward).
        r1_noise: the perturbation scale α of the approximate R1 penalty.
        update_ratio: fake-score and discriminator updates per generator update (two-time-scale rule; the
            generator is trained on every ``update_ratio``-th optimizer step, the critics on all).
        noise: the noise-level distribution shared by the fake-score loss, the DM loss and the discriminator:
            ``ramp`` — a uniform position t ∈ [t_min, t_max] on the Karras ramp (DMD2's uniform timesteps);
            ``lognormal`` — ln σ ~ N(noise_p_mean, noise_p_std²) (EDM's training distribution), clamped to the
            ramp's [σ(t_min), σ(t_max)].
        t_min: lower end of the noise-level range, as a position on the Karras ramp (0 = σ_min).
        t_max: upper end of the noise-level range (1 = σ_max).
        noise_p_mean: P_mean of the ``lognormal`` noise.
        noise_p_std: P_std of the ``lognormal`` noise.
        gan_t_min: lower end of the GAN terms' own noise range (position on the ramp).
        gan_t_max: upper end of the GAN terms' own noise range (0.5 ≈ σ 2.5 on EDM's ramp: the low-σ half).
        gan_fraction: fraction of the discriminator's real and generated samples drawn from the GAN range; the rest
            come from the shared distribution, where the DM term reads r.
        disc_features: ``teacher`` — the head reads the frozen teacher's feature levels; ``fake_score`` — the
            trainable fake score's (DMD2: the classifier branch on the fake score's encoder, trained with it).
        disc_pool: position-blind heads (average over positions/tokens) instead of position-aware ones.
        logit_clip: clamp of the discriminator logit before r = exp(ℓ).
        ratio_min: lower clamp of r.
        ratio_max: upper clamp of r.
        ratio_bins: divide r by its running mean in this many noise-level bins (E_q[r] = 1 at every level, as
            f-distill's reference code does); 0 = off.
        ratio_ema: EMA rate of those bin means (0 = this batch's means only).
        fake_lr_scale: the fake score's learning rate relative to the optimizer's lr.
        disc_lr_scale: the discriminator head's learning rate relative to the optimizer's lr.
        disc_hidden: width of every level's head (0 = that level's feature width).
        ema_halflife_steps: half-life of the generator EMA in generator updates; 0 = no EMA.
        ema_sigma_rel: instead, a power-function EMA of the generator over its updates (EDM2 eq. 3 / App. C.1:
            update k weighted ∝ k^γ) of this relative width σ_rel (EDM2 eq. 4; < 0.289, → 0.289 is the uniform
            average); 0 = off. Short GAN-trained runs gain from a wide average (benchmarks/RESULTS.md, issue 16).
        optimizer: optimizer factory (one optimizer; see the update scheme in the module docstring).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this optimizer step (0 = constant).
        lora: LoRA adapters instead of a full student, e.g. {rank: 8, alpha: 8, targets: [...]} (alpha = rank and
            per-network targets by default; ``lit_gen.nets.lora``); null = train every weight.
        teacher_zero3: under DeepSpeed ZeRO-3, ``partition`` or ``replicate`` the frozen teacher (see
            ``lit_gen.methods.distill``).
    """

    method_name = "fdistill"
    default_sampler = "euler"
    default_steps = 1
    supports_zero3 = True  # see "DeepSpeed ZeRO-3" in the module docstring

    def __init__(
        self,
        teacher: str,
        net: nn.Module | None = None,
        param: EDM | VP | None = None,
        guidance: float | list[float] = 1.0,
        init_from_teacher: bool = True,
        student_dropout: float | None = 0.0,
        divergence: str = "js",
        alpha: float = 0.5,
        gan_weight: float = 1e-3,
        r1_weight: float = 0.0,
        r1_kind: str = "approx",
        r1_noise: float = 0.1,
        update_ratio: int = 5,
        noise: str = "ramp",
        t_min: float = 0.02,
        t_max: float = 0.98,
        noise_p_mean: float = -1.2,
        noise_p_std: float = 1.2,
        gan_t_min: float = 0.0,
        gan_t_max: float = 0.5,
        gan_fraction: float = 0.5,
        disc_features: str = "teacher",
        disc_pool: bool = False,
        logit_clip: float = 10.0,
        ratio_min: float = 0.1,
        ratio_max: float = 20.0,
        ratio_bins: int = 10,
        ratio_ema: float = 0.0,
        fake_lr_scale: float = 1.0,
        disc_lr_scale: float = 1.0,
        disc_hidden: int = 0,
        ema_halflife_steps: float = 0.0,
        ema_sigma_rel: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        guide_teacher: str | None = None,
        guidance_sigma_max: float = 0.0,
        lora: LoRASpec | None = None,
        teacher_zero3: str = "partition",
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
            decay_steps=decay_steps,
            teacher_zero3=teacher_zero3,
        )
        self.divergence = get_divergence(divergence, alpha)
        checks = [
            (update_ratio >= 1, f"update_ratio must be >= 1, got {update_ratio}"),
            (0.0 <= t_min < t_max <= 1.0, f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}"),
            (gan_weight >= 0 and r1_weight >= 0, "gan_weight and r1_weight must be >= 0"),
            (0 < ratio_min < 1 < ratio_max, f"need 0 < ratio_min < 1 < ratio_max, got {ratio_min}, {ratio_max}"),
            (logit_clip > 0, f"logit_clip must be positive, got {logit_clip}"),
            (ratio_bins >= 0 and 0.0 <= ratio_ema < 1.0, "need ratio_bins >= 0 and 0 <= ratio_ema < 1"),
            (fake_lr_scale > 0 and disc_lr_scale > 0, "fake_lr_scale and disc_lr_scale must be positive"),
            (ema_halflife_steps >= 0, f"ema_halflife_steps must be >= 0, got {ema_halflife_steps}"),
            (guidance_sigma_max >= 0, f"guidance_sigma_max must be >= 0, got {guidance_sigma_max}"),
            (
                not (ema_halflife_steps > 0 and ema_sigma_rel > 0),
                "set one of ema_halflife_steps and ema_sigma_rel, not both",
            ),
            (noise in NOISE_DISTRIBUTIONS, f"unknown noise {noise!r}; choose one of {', '.join(NOISE_DISTRIBUTIONS)}"),
            (noise_p_std > 0, f"noise_p_std must be positive, got {noise_p_std}"),
            (
                0.0 <= gan_t_min < gan_t_max <= 1.0,
                f"need 0 <= gan_t_min < gan_t_max <= 1, got {gan_t_min}, {gan_t_max}",
            ),
            (0.0 <= gan_fraction <= 1.0, f"gan_fraction must be in [0, 1], got {gan_fraction}"),
            (r1_kind in ("approx", "grad"), f"unknown r1_kind {r1_kind!r}; choose approx or grad"),
            (
                disc_features in ("teacher", "fake_score"),
                f"unknown disc_features {disc_features!r}; choose teacher or fake_score",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise LitGenError(message)
        self.gan_weight = float(gan_weight)
        self.r1_weight = float(r1_weight)
        self.r1_noise = float(r1_noise)
        self.r1_kind = r1_kind
        self.update_ratio = int(update_ratio)
        self.noise = noise
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.noise_p_mean, self.noise_p_std = float(noise_p_mean), float(noise_p_std)
        self.gan_t_min, self.gan_t_max, self.gan_fraction = float(gan_t_min), float(gan_t_max), float(gan_fraction)
        self.disc_features = disc_features
        self.logit_clip, self.ratio_min, self.ratio_max = float(logit_clip), float(ratio_min), float(ratio_max)
        self.ratio_ema = float(ratio_ema)
        self.lr_scales = {"generator": 1.0, "fake_score": float(fake_lr_scale), "discriminator": float(disc_lr_scale)}
        self.ema_halflife_steps = float(ema_halflife_steps)
        self.ema_sigma_rel = float(ema_sigma_rel)
        # γ of the power-function EMA, once (gamma_from_sigma_rel gives the one-line error for a width out of range)
        self.ema_gamma = gamma_from_sigma_rel(self.ema_sigma_rel) if self.ema_sigma_rel != 0 else None
        self.guidance_sigma_max = float(guidance_sigma_max)

        # Fake score: a trainable copy of the teacher (DMD §3.2: initialised from the real score), with the
        # students' dropout (0 by default, ALGORITHMS.md §7).
        self.fake_net = trainable_copy(self.teacher_net, self.student_dropout)
        if self.guidance_range is not None:
            self.fake_net = with_guidance_embed(self.fake_net)
        # Discriminator heads on the feature levels, needed for r (all divergences but rkl) and the GAN term.
        self.disc: MultiLevelDiscriminator | None = None
        if self.divergence.needs_ratio or self.gan_weight > 0:
            self.disc = MultiLevelDiscriminator(self.feature_shapes(), hidden=disc_hidden, pool=disc_pool)
        self.net_ema: nn.Module | None = None
        if self.ema_halflife_steps > 0 or self.ema_gamma is not None:
            self.net_ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        # Method state (DESIGN style 9): checkpointed with the module.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("ratio_bin_mean", torch.ones(max(int(ratio_bins), 0), dtype=torch.float32))
        # LoRA: generator and fake score become adapters over the teacher's one frozen base (lit_gen.nets.lora).
        adapt_method(self, lora, ("net", "fake_net"), {"net_ema": "net"})

    # ------------------------------------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> FDistill:
        super().train(mode)
        if self.net_ema is not None:
            self.net_ema.eval()
        return self

    def feature_shapes(self) -> list[list[int]]:
        """Shapes of the feature levels the head reads, for one sample (probed once on a zero input)."""
        shape = (self.teacher_description.get("data") or {}).get("shape")
        if not shape:
            raise LitGenError(f"the teacher {self.teacher_path} does not record its data shape")
        net = self.teacher_net if self.disc_features == "teacher" else self.fake_net
        if not (hasattr(net, "feature_levels") or hasattr(net, "features")):
            raise LitGenError(f"the teacher network {type(net).__name__} has no features() for the discriminator")
        with torch.no_grad(), eval_mode(net):
            levels = self.disc_feature_levels(torch.zeros(1, *shape), torch.ones(1), None)
        return [list(f.shape[1:]) for f in levels]

    def disc_feature_levels(
        self, x: Tensor, sigma: Tensor, label: Tensor | None, detach_net: bool = False, w: Tensor | None = None
    ) -> list[Tensor]:
        """The feature levels the head reads at the noisy input x (σ): the frozen teacher's, or the fake score's
        (``detach_net``: with its weights detached, for the generator's terms; at the guidance weights ``w`` of a
        w-conditioned run). Gradient reaches x if it has one."""
        capture = _CaptureInput()
        self.param.denoise(capture, x, sigma, label)
        if self.disc_features == "teacher":
            return feature_levels(self.teacher_net, *capture.args)
        if not detach_net:
            return feature_levels(bind_guidance(self.fake_net, w), *capture.args)
        with eval_mode(self.fake_net), frozen_weights(self.fake_net):
            return feature_levels(bind_guidance(self.fake_net, w), *capture.args)

    def logits(
        self,
        x: Tensor,
        sigma: Tensor,
        label: Tensor | None,
        detach_head: bool = False,
        features_grad: bool = True,
        w: Tensor | None = None,
    ) -> Tensor:
        """ℓ_ψ(feature levels of x at σ), shape [B]. ``detach_head``: no gradient to the head's (and a fake-score
        feature net's) weights — the generator's view; ``features_grad`` False: features without gradient."""
        assert self.disc is not None
        with torch.set_grad_enabled(features_grad and torch.is_grad_enabled()):
            feats = self.disc_feature_levels(x, sigma, label, detach_net=detach_head, w=w)
        if not detach_head:
            return self.disc(feats)
        with frozen_weights(self.disc):
            return self.disc(feats)

    def ramp_sigma(self, t: Tensor) -> Tensor:
        return ramp_sigma(t, self.param.sigma_min, self.param.sigma_max)

    def sample_noise(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(u, σ): σ from the shared noise distribution (``noise``) and u ∈ [0, 1] its position within
        [t_min, t_max] on the Karras ramp (the ratio normaliser's bin coordinate). Shapes [n]."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        if self.noise == "ramp":
            u = torch.rand(n, device=like.device, dtype=dtype)
            return u, self.ramp_sigma(self.t_min + (self.t_max - self.t_min) * u)
        lo, hi = self.ramp_sigma(torch.tensor([self.t_min, self.t_max], dtype=torch.float64)).tolist()
        normal = torch.randn(n, device=like.device, dtype=dtype)
        sigma = torch.exp(normal * self.noise_p_std + self.noise_p_mean).clamp(lo, hi)
        t = ramp_position(sigma, self.param.sigma_min, self.param.sigma_max)
        return ((t - self.t_min) / (self.t_max - self.t_min)).clamp(0, 1), sigma

    def sample_gan_sigma(self, n: int, like: Tensor) -> Tensor:
        """σ of the GAN terms' own range: a uniform position in [gan_t_min, gan_t_max] on the Karras ramp."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        t = self.gan_t_min + (self.gan_t_max - self.gan_t_min) * torch.rand(n, device=like.device, dtype=dtype)
        return self.ramp_sigma(t)

    def in_gan_range(self, sigma: Tensor) -> Tensor:
        """Which σ lie in the GAN terms' range (a bool mask)."""
        t = ramp_position(sigma, self.param.sigma_min, self.param.sigma_max)
        return (t >= self.gan_t_min - 1e-6) & (t <= self.gan_t_max + 1e-6)

    def disc_sigma(self, n: int, like: Tensor) -> Tensor:
        """The discriminator's noise levels: the first ⌊gan_fraction·n⌉ from the GAN range, the rest shared."""
        k = int(round(self.gan_fraction * n))
        return torch.cat([self.sample_gan_sigma(k, like), self.sample_noise(n - k, like)[1]])

    def reduce_sum(self, value: Tensor) -> Tensor:
        """Sum over all ranks (identity without a distributed trainer) — for batch statistics, no gradient."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def is_generator_step(self) -> bool:
        """The generator is trained on optimizer steps 0, update_ratio, 2·update_ratio, ..."""
        return int(self.updates) % self.update_ratio == 0

    def generate(self, z: Tensor, label: Tensor | None, w: Tensor | None = None) -> Tensor:
        """G_θ(z[, w]) = D_θ(σ_max z; σ_max[, w]): one student step from pure noise."""
        sigma = torch.full((z.shape[0],), self.param.sigma_max, device=z.device, dtype=torch.float32)
        return self.param.denoise(bind_guidance(self.net, w), self.param.sigma_max * z, sigma, label)

    # ------------------------------------------------------------------------------------------------ f weights
    def weights(self, logit: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(ĥ, r): normalised f-distill weights (batch mean 1 over all ranks) and the clamped ratio, float32.
        ``u`` ∈ [0, 1]: each sample's noise-level position (``sample_noise``), the bin of the ratio normaliser."""
        r = density_ratio(logit, self.logit_clip, self.ratio_min, self.ratio_max)
        bins = self.ratio_bin_mean.numel()
        if bins:
            with torch.no_grad():
                sums, counts = ratio_bin_means(r, u, bins, self.reduce_sum)
                seen = counts > 0
                batch_mean = torch.where(seen, sums / counts.clamp_min(1), torch.ones_like(sums))
                old = self.ratio_bin_mean.to(batch_mean.dtype)
                new = torch.where(seen, self.ratio_ema * old + (1 - self.ratio_ema) * batch_mean, old)
                self.ratio_bin_mean.copy_(new.to(self.ratio_bin_mean.dtype))
                idx = (u * bins).floor().long().clamp(0, bins - 1)
                r = r / (new[idx] + 1e-6)
        h = self.divergence.h(r)
        return normalized_weights(h, self.reduce_sum), r

    def dm_guidance(self, sigma: Tensor, w: Tensor | None) -> Tensor | None:
        """The guidance weights of the DM term's teacher target: the generator's ``w`` (or the fixed ``guidance``),
        replaced by 1 above ``guidance_sigma_max`` (a limited guidance interval); ``w`` itself when that is off."""
        if self.guidance_sigma_max <= 0:
            return w
        scale = w if w is not None else torch.full_like(sigma, float(self.guidance if self.guidance else 1.0))
        return torch.where(sigma > self.guidance_sigma_max, torch.ones_like(scale), scale.to(sigma.dtype))

    # ------------------------------------------------------------------------------------------------ losses
    def loss_fake_score(self, x0: Tensor, label: Tensor | None, w: Tensor | None = None) -> Tensor:
        """Denoising score matching of D_φ on sg(G_θ(z)) at σ from the shared noise distribution, weighted as the
        teacher's own loss (EDM λ(σ) / VP's weighting): DMD eq. 6, DMD2's ``compute_loss_fake``."""
        _, sigma = self.sample_noise(x0.shape[0], x0)
        return dsm_loss_at(self.param, bind_guidance(self.fake_net, w), x0.detach(), sigma, label).mean()

    def loss_discriminator(
        self, x0: Tensor, y: Tensor, label: Tensor | None, real_label: Tensor | None, w: Tensor | None = None
    ) -> dict:
        """Logistic loss of the head on noisy generated vs noisy real samples (+ R1 on the real ones). With
        guidance weights ``w`` (one per generated sample) the real rows are read at the same w."""
        b = x0.shape[0]
        sigma_f, sigma_r = self.disc_sigma(b, x0), self.disc_sigma(y.shape[0], y)
        x_fake = x0.detach() + append_dims(sigma_f, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        x_real = y + append_dims(sigma_r, y.ndim).to(y.dtype) * torch.randn_like(y)
        both_label = None if label is None else torch.cat([label, real_label])
        w_real = None if w is None else w[torch.arange(y.shape[0], device=w.device) % w.shape[0]]
        both_w = None if w is None else torch.cat([w, w_real])
        exact_r1 = self.r1_weight > 0 and self.r1_kind == "grad"
        if exact_r1:
            x_real = x_real.detach().requires_grad_(True)
        # Teacher features need no gradient (frozen); a fake-score feature net is trained by this loss (DMD2).
        logit = self.logits(
            torch.cat([x_fake, x_real]), torch.cat([sigma_f, sigma_r]), both_label,
            features_grad=self.disc_features == "fake_score" or exact_r1, w=both_w,
        )  # fmt: skip
        logit_fake, logit_real = logit.float().split([b, y.shape[0]])
        out = {"loss": gan_discriminator_loss(logit_real, logit_fake), "logit_fake": logit_fake.detach()}
        out["logit_real"] = logit_real.detach()
        out["gan_range_fake"] = self.in_gan_range(sigma_f)
        out["gan_range_real"] = self.in_gan_range(sigma_r)
        if self.r1_weight > 0:
            if exact_r1:
                (grad,) = torch.autograd.grad(logit_real.sum(), x_real, create_graph=True)
                r1 = grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()
            else:
                x_pert = x_real + self.r1_noise * torch.randn_like(x_real)
                logit_pert = self.logits(x_pert, sigma_r, real_label, features_grad=False, w=w_real)
                r1 = F.mse_loss(logit_real, logit_pert.float())
            out["r1"] = r1.detach()
            out["loss"] = out["loss"] + self.r1_weight * r1
        return out

    def loss_generator(self, x0: Tensor, label: Tensor | None, w: Tensor | None = None) -> dict:
        """f-distill's weighted DM loss (+ λ_GAN · GAN loss) at x_σ = G_θ(z) + σ ε; gradient only to θ.

        The teacher and the fake score both run deterministically (eval mode): with fake = teacher the DM gradient
        is exactly zero, whatever dropout the fake score trains with."""
        u, sigma = self.sample_noise(x0.shape[0], x0)
        x_t = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        with torch.no_grad(), eval_mode(self.fake_net):
            x_teacher = self.teacher_denoise(x_t, sigma, label, self.dm_guidance(sigma, w))
            x_fake = self.param.denoise(bind_guidance(self.fake_net, w), x_t, sigma, label)
        out: dict[str, Tensor] = {}
        weight = None
        loss = torch.zeros((), device=x0.device)
        if self.disc is not None:
            # Gradient reaches θ through the feature net only when the GAN term is on.
            with torch.set_grad_enabled(self.gan_weight > 0):
                logit = self.logits(x_t, sigma, label, detach_head=True, w=w).float()
            if self.gan_weight > 0:
                mask = self.in_gan_range(sigma).to(logit.dtype)
                # Mean over the samples in the GAN range (the local count; no sample in range gives 0).
                out["gan"] = (F.softplus(-logit) * mask).sum() / mask.sum().clamp_min(1.0)
                loss = loss + self.gan_weight * out["gan"]
            out["logit"] = logit.detach()
            out["r_raw"] = density_ratio(logit.detach(), self.logit_clip, self.ratio_min, self.ratio_max)
            if self.divergence.needs_ratio:
                weight, r = self.weights(logit.detach(), u)
                out["weight"], out["r"] = weight, r
        out["dm"] = distribution_matching_loss(x0, x_teacher, x_fake, weight)
        out["loss"] = loss + out["dm"]
        return out

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        y = batch["x"]
        label = batch.get("label") if self.num_classes else None
        b = y.shape[0]
        generator_step = self.is_generator_step()
        z = torch.randn_like(y)
        w = self.sample_guidance(b, y.device)  # a w-conditioned generator (Meng et al. 2023): one w per sample
        # One generator forward per step; only generator steps keep its graph (and every step under ZeRO-3).
        zero3 = partitioned(self.net)
        with torch.set_grad_enabled(generator_step or zero3):
            x0 = self.generate(z, label, w)
        fake_loss = self.loss_fake_score(x0, label, w)
        total = fake_loss
        logs: dict[str, Tensor] = {"train/loss_fake": fake_loss.detach()}
        if self.disc is not None:
            d = self.loss_discriminator(x0, y, label, label, w)
            total = total + d["loss"]
            acc_real, acc_fake = (d["logit_real"] > 0).float(), (d["logit_fake"] < 0).float()
            logs.update(
                {
                    "train/loss_disc": d["loss"].detach(),
                    "train/disc_accuracy": 0.5 * (acc_real.mean() + acc_fake.mean()),
                    "train/disc_acc_real": acc_real.mean(),
                    "train/disc_acc_fake": acc_fake.mean(),
                }
            )
            low_r, low_f = d["gan_range_real"], d["gan_range_fake"]
            if bool(low_r.any()) and bool(low_f.any()):  # accuracy within the GAN terms' (low-σ) range
                logs["train/disc_accuracy_gan_range"] = 0.5 * (acc_real[low_r].mean() + acc_fake[low_f].mean())
            logs["train/logit_fake"] = d["logit_fake"].mean()
            logs["train/logit_real"] = d["logit_real"].mean()
            if "r1" in d:
                logs["train/r1"] = d["r1"]
            self._log_histograms(d["logit_fake"], d["logit_real"])
        if generator_step:
            g = self.loss_generator(x0, label, w)
            total = total + g["loss"]
            logs["train/loss_dm"] = g["dm"].detach()
            if "gan" in g:
                logs["train/loss_gan_gen"] = g["gan"].detach()
            if "r_raw" in g:
                logs["train/ratio_std"] = g["r_raw"].std() if g["r_raw"].numel() > 1 else torch.zeros(())
                logs["train/log_ratio_std"] = g["logit"].std() if g["logit"].numel() > 1 else torch.zeros(())
            if "weight" in g:
                logs.update(self._weight_stats(g["weight"], g["r"]))
        else:
            # Exactly-zero gradient for every generator parameter (DDP's reducer and ZeRO's buffers expect one;
            # FSDP2's sharded DTensor parameters need none and cannot mix into the loss: skipped).
            if zero3:
                total = total + 0.0 * x0.float().sum()
            else:
                params = [p for p in self.net.parameters() if not isinstance(p, DTensor)]
                total = total + 0.0 * sum(p.reshape(-1)[:1].sum() for p in params)
        self.log_dict(logs, batch_size=b)
        return total

    def _weight_stats(self, weight: Tensor, r: Tensor) -> dict[str, Tensor]:
        """Statistics of the active weights, and of every table divergence's weights on the same r (float32)."""
        stats = {
            "train/weight_min": weight.min(),
            "train/weight_max": weight.max(),
            "train/weight_std": weight.std() if weight.numel() > 1 else torch.zeros(()),
            "train/ratio_mean": r.mean(),
        }
        for name, div in DIVERGENCES.items():
            if name != "rkl":
                w = normalized_weights(div.h(r))
                stats[f"weights/{name}_max"] = w.max()
                stats[f"weights/{name}_std"] = w.std() if w.numel() > 1 else torch.zeros(())
        return stats

    def _log_histograms(self, logit_fake: Tensor, logit_real: Tensor) -> None:
        """ln r histograms (discriminator logits on generated and real samples) to TensorBoard, rank 0."""
        trainer = self._trainer
        if trainer is None or trainer.global_rank != 0 or not isinstance(trainer.logger, TensorBoardLogger):
            return
        every = max(int(trainer.log_every_n_steps), 1)
        if trainer.global_step % every:
            return
        experiment = trainer.logger.experiment
        experiment.add_histogram("train/log_r_fake", logit_fake.float().cpu(), trainer.global_step)
        experiment.add_histogram("train/log_r_real", logit_real.float().cpu(), trainer.global_step)

    # ------------------------------------------------------------------------------------------------ optimizer
    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Three named parameter groups for one optimizer (the frozen teacher and the EMA are not in it; a LoRA
        student's shared base neither)."""
        groups = [
            {"params": [p for p in self.net.parameters() if p.requires_grad], "name": "generator"},
            {"params": [p for p in self.fake_net.parameters() if p.requires_grad], "name": "fake_score"},
        ]
        if self.disc is not None:
            groups.append({"params": list(self.disc.parameters()), "name": "discriminator"})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        for group in optimizer.param_groups:
            group["lr"] *= self.lr_scales[group["name"]]
        if self.warmup_steps <= 0 and self.decay_steps <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """Step only the groups active this step (see the module docstring); then count the step and update the
        generator EMA after a generator update."""
        # Lightning calls this hook first and runs training_step inside the closure: both read the same counter.
        generator_step = self.is_generator_step()
        active = GROUPS if generator_step else GROUPS[1:]
        groups = getattr(optimizer, "_optimizer", optimizer).param_groups
        inactive = [g for g in groups if g.get("name") not in active]
        emptied: list[tuple[dict, list]] = []

        def closure() -> Any:
            result = optimizer_closure() if optimizer_closure is not None else None
            # After zero_grad + backward, before the update: hide the inactive groups from the optimizer.
            for group in inactive:
                emptied.append((group, group["params"]))
                group["params"] = []
            return result

        try:
            with skip_param_groups(optimizer, [g["name"] for g in inactive]):
                optimizer.step(closure=closure)
        finally:
            for group, params in emptied:
                group["params"] = params
                for p in params:
                    p.grad = None
        self.updates += 1
        if generator_step:
            self.generator_updates += 1
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← β θ_ema + (1 − β) θ after k generator updates, with β = min(0.5^(1/half-life), (1 + k)/(10 + k))
        (the warm-up of tf.train.ExponentialMovingAverage, so the teacher's initial weights fade quickly), or with
        ``ema_sigma_rel`` the power-function β_k = (1 − 1/k)^(γ+1) (EDM2 App. C.1; k = 1 copies θ)."""
        if self.net_ema is None:
            return
        k = int(self.generator_updates)
        if self.ema_gamma is not None:
            beta = power_beta(k, self.ema_gamma)
        else:
            beta = min(0.5 ** (1.0 / self.ema_halflife_steps), (1 + k) / (10 + k))
        with gathered_copy(self.net_ema, self.net):
            for e, p in zip(self.net_ema.parameters(), self.net.parameters(), strict=True):
                e.lerp_(p.detach().to(e.dtype), 1.0 - beta)
        for e, b in zip(self.net_ema.buffers(), self.net.buffers(), strict=True):
            e.copy_(b)

    # ------------------------------------------------------------------------------------------------ checkpoint
    def describe(self) -> dict[str, Any]:
        section = super().describe()
        sigma_max = float(self.param.sigma_max)
        section["sampling"] = {"sampler": "euler", "steps": 1, "grid": [sigma_max, 0.0], "grid_exact": True}
        section["fdistill"] = {"divergence": self.divergence.name, "gan_weight": self.gan_weight}
        if self.net_ema is not None:
            section["ema_prefix"] = "net_ema."
        return section
