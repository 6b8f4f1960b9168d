"""f-distill: a one-step student by f-divergence distribution matching (Xu, Nie & Vahdat 2025, "One-step Diffusion
Models with f-Divergence Distribution Matching"), with DMD/VSD (Yin et al. 2024, Wang et al. 2023) as its
reverse-KL case and DMD2's GAN head (Yin et al. 2024b) — ALGORITHMS.md §5.

Networks (all started from the teacher's weights except the head):
- generator G_θ(z) = D_θ(σ_max z; σ_max): the student denoiser evaluated once at the top noise level (``net``);
- fake score D_φ (``fake_net``): denoising score matching on sg(G_θ(z)), so it tracks the student's density q;
- discriminator head ℓ_ψ (``disc``) on the frozen teacher's features of noisy samples: logistic loss on noisy
  real vs noisy generated samples, so ℓ → ln r with r = p_σ/q_σ (teacher over student density);
- frozen teacher D_T (``teacher_net``), optionally classifier-free guided.

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
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lit_gen.diffusion import EDM, VP, append_dims
from lit_gen.errors import LitGenError
from lit_gen.methods.distill import DistillationMethod
from lit_gen.methods.divergences import (
    DIVERGENCES,
    density_ratio,
    get_divergence,
    normalized_weights,
    ratio_bin_means,
)
from lit_gen.nets.discriminator import DiscriminatorHead

GROUPS = ("generator", "fake_score", "discriminator")


# --------------------------------------------------------------------------------------------- the losses, as math
def ramp_sigma(t: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """σ(t) = (σ_min^(1/ρ) + t (σ_max^(1/ρ) − σ_min^(1/ρ)))^ρ, t ∈ [0, 1]: the Karras ramp (EDM eq. 5) as a
    continuous map. DMD2 draws its noise level uniformly among the ramp's points between 2 % and 98 % (the EDM
    experiments' ``min/max_step_percent``); t ~ U[t_min, t_max] here is the continuous version."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


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
        guidance: classifier-free guidance scale of the distilled teacher (1 = unguided).
        init_from_teacher: start generator and fake score from the teacher's weights.
        divergence: one of ``rkl`` (reverse KL = DMD/VSD), ``softened_rkl``, ``js``, ``hellinger``, ``fkl``,
            ``jeffreys``, ``alpha`` (see ``lit_gen.methods.divergences``).
        alpha: α of the ``alpha`` divergence (h = r^α).
        gan_weight: λ_GAN, weight of the generator's GAN loss; 0 with ``rkl`` is plain DMD (no discriminator).
        r1_weight: weight of the approximate R1 penalty on the head (‖ℓ(x) − ℓ(x + α n)‖², Lin et al. 2024;
            0 = off).
        r1_noise: the perturbation scale α of the approximate R1 penalty.
        update_ratio: fake-score and discriminator updates per generator update (two-time-scale rule; the
            generator is trained on every ``update_ratio``-th optimizer step, the critics on all).
        t_min: lower end of the noise-level distribution, as a position on the Karras ramp (0 = σ_min).
        t_max: upper end of the noise-level distribution (1 = σ_max).
        logit_clip: clamp of the discriminator logit before r = exp(ℓ).
        ratio_min: lower clamp of r.
        ratio_max: upper clamp of r.
        ratio_bins: divide r by its running mean in this many noise-level bins (E_q[r] = 1 at every level, as
            f-distill's reference code does); 0 = off.
        ratio_ema: EMA rate of those bin means (0 = this batch's means only).
        fake_lr_scale: the fake score's learning rate relative to the optimizer's lr.
        disc_lr_scale: the discriminator head's learning rate relative to the optimizer's lr.
        disc_hidden: width of the head (0 = the teacher's feature width).
        ema_halflife_steps: half-life of the generator EMA in generator updates; 0 = no EMA.
        optimizer: optimizer factory (one optimizer; see the update scheme in the module docstring).
        warmup_steps: linear learning-rate warm-up in optimizer steps.
        decay_steps: linear learning-rate decay to 0 at this optimizer step (0 = constant).
    """

    method_name = "fdistill"
    default_sampler = "euler"
    default_steps = 1

    def __init__(
        self,
        teacher: str,
        net: nn.Module | None = None,
        param: EDM | VP | None = None,
        guidance: float = 1.0,
        init_from_teacher: bool = True,
        divergence: str = "js",
        alpha: float = 0.5,
        gan_weight: float = 1e-3,
        r1_weight: float = 0.0,
        r1_noise: float = 0.1,
        update_ratio: int = 5,
        t_min: float = 0.02,
        t_max: float = 0.98,
        logit_clip: float = 10.0,
        ratio_min: float = 0.1,
        ratio_max: float = 20.0,
        ratio_bins: int = 10,
        ratio_ema: float = 0.0,
        fake_lr_scale: float = 1.0,
        disc_lr_scale: float = 1.0,
        disc_hidden: int = 0,
        ema_halflife_steps: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        decay_steps: int = 0,
    ) -> None:
        super().__init__(
            teacher=teacher,
            net=net,
            param=param,
            guidance=guidance,
            init_from_teacher=init_from_teacher,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
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
        ]
        for ok, message in checks:
            if not ok:
                raise LitGenError(message)
        self.gan_weight = float(gan_weight)
        self.r1_weight = float(r1_weight)
        self.r1_noise = float(r1_noise)
        self.update_ratio = int(update_ratio)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.logit_clip, self.ratio_min, self.ratio_max = float(logit_clip), float(ratio_min), float(ratio_max)
        self.ratio_ema = float(ratio_ema)
        self.lr_scales = {"generator": 1.0, "fake_score": float(fake_lr_scale), "discriminator": float(disc_lr_scale)}
        self.ema_halflife_steps = float(ema_halflife_steps)

        # Fake score: a trainable copy of the teacher (DMD §3.2: initialised from the real score).
        self.fake_net = copy.deepcopy(self.teacher_net).requires_grad_(True).train()
        # Discriminator head on the teacher's features, needed for r (all divergences but rkl) and the GAN term.
        self.disc: DiscriminatorHead | None = None
        if self.divergence.needs_ratio or self.gan_weight > 0:
            self.disc = DiscriminatorHead(self.teacher_feature_shape(), hidden=disc_hidden)
        self.net_ema: nn.Module | None = None
        if self.ema_halflife_steps > 0:
            self.net_ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        # Method state (DESIGN style 9): checkpointed with the module.
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("generator_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("ratio_bin_mean", torch.ones(max(int(ratio_bins), 0), dtype=torch.float32))

    # ------------------------------------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> FDistill:
        super().train(mode)
        if self.net_ema is not None:
            self.net_ema.eval()
        return self

    def teacher_feature_shape(self) -> list[int]:
        """Shape of the teacher's ``features`` for one sample (probed once on a zero input)."""
        shape = (self.teacher_description.get("data") or {}).get("shape")
        if not shape:
            raise LitGenError(f"the teacher {self.teacher_path} does not record its data shape")
        if not hasattr(self.teacher_net, "features"):
            raise LitGenError(f"the teacher network {type(self.teacher_net).__name__} has no features() for the head")
        with torch.no_grad():
            x = torch.zeros(1, *shape)
            feats = self.teacher_features(x, torch.ones(1))
        return list(feats.shape[1:])

    def teacher_features(self, x: Tensor, sigma: Tensor, label: Tensor | None = None) -> Tensor:
        """The frozen teacher's intermediate features at the noisy input x (σ), with gradient to x if x has one."""
        capture = _CaptureInput()
        self.param.denoise(capture, x, sigma, label)
        return self.teacher_net.features(*capture.args)

    def logits(self, x: Tensor, sigma: Tensor, label: Tensor | None, detach_head: bool = False) -> Tensor:
        """ℓ_ψ(teacher features of x at σ), shape [B]; ``detach_head`` = no gradient to the head's weights."""
        assert self.disc is not None
        feats = self.teacher_features(x, sigma, label)
        if not detach_head:
            return self.disc(feats)
        params = {name: p.detach() for name, p in self.disc.named_parameters()}
        return torch.func.functional_call(self.disc, params, (feats,))

    def sample_t_sigma(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(t, σ(t)) with t ~ U[t_min, t_max] on the Karras ramp of the parameterisation's [σ_min, σ_max]."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(n, device=like.device, dtype=dtype)
        return t, ramp_sigma(t, self.param.sigma_min, self.param.sigma_max)

    def reduce_sum(self, value: Tensor) -> Tensor:
        """Sum over all ranks (identity without a distributed trainer) — for batch statistics, no gradient."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def is_generator_step(self) -> bool:
        """The generator is trained on optimizer steps 0, update_ratio, 2·update_ratio, ..."""
        return int(self.updates) % self.update_ratio == 0

    def generate(self, z: Tensor, label: Tensor | None) -> Tensor:
        """G_θ(z) = D_θ(σ_max z; σ_max): one student step from pure noise."""
        sigma = torch.full((z.shape[0],), self.param.sigma_max, device=z.device, dtype=torch.float32)
        return self.param.denoise(self.net, self.param.sigma_max * z, sigma, label)

    # ------------------------------------------------------------------------------------------------ f weights
    def weights(self, logit: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(ĥ, r): normalised f-distill weights (batch mean 1 over all ranks) and the clamped ratio, float32."""
        r = density_ratio(logit, self.logit_clip, self.ratio_min, self.ratio_max)
        bins = self.ratio_bin_mean.numel()
        if bins:
            with torch.no_grad():
                sums, counts = ratio_bin_means(r, (t - self.t_min) / (self.t_max - self.t_min), bins, self.reduce_sum)
                seen = counts > 0
                batch_mean = torch.where(seen, sums / counts.clamp_min(1), torch.ones_like(sums))
                old = self.ratio_bin_mean.to(batch_mean.dtype)
                new = torch.where(seen, self.ratio_ema * old + (1 - self.ratio_ema) * batch_mean, old)
                self.ratio_bin_mean.copy_(new.to(self.ratio_bin_mean.dtype))
                idx = (((t - self.t_min) / (self.t_max - self.t_min)) * bins).floor().long().clamp(0, bins - 1)
                r = r / (new[idx] + 1e-6)
        h = self.divergence.h(r)
        return normalized_weights(h, self.reduce_sum), r

    # ------------------------------------------------------------------------------------------------ losses
    def loss_fake_score(self, x0: Tensor, label: Tensor | None) -> Tensor:
        """Denoising score matching of D_φ on sg(G_θ(z)) with the teacher's own loss (EDM eq. 2 / VP)."""
        return self.param.loss(self.fake_net, x0.detach(), label).mean()

    def loss_discriminator(self, x0: Tensor, y: Tensor, label: Tensor | None, real_label: Tensor | None) -> dict:
        """Logistic loss of the head on noisy generated vs noisy real samples (+ approximate R1 on the real ones)."""
        b = x0.shape[0]
        _, sigma_f = self.sample_t_sigma(b, x0)
        _, sigma_r = self.sample_t_sigma(y.shape[0], y)
        x_fake = x0.detach() + append_dims(sigma_f, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        x_real = y + append_dims(sigma_r, y.ndim).to(y.dtype) * torch.randn_like(y)
        both_label = None if label is None else torch.cat([label, real_label])
        with torch.no_grad():
            feats = self.teacher_features(torch.cat([x_fake, x_real]), torch.cat([sigma_f, sigma_r]), both_label)
        logit_fake, logit_real = self.disc(feats).float().split([b, y.shape[0]])
        out = {"loss": gan_discriminator_loss(logit_real, logit_fake), "logit_fake": logit_fake.detach()}
        out["logit_real"] = logit_real.detach()
        if self.r1_weight > 0:
            with torch.no_grad():
                feats_pert = self.teacher_features(
                    x_real + self.r1_noise * torch.randn_like(x_real), sigma_r, real_label
                )
            r1 = F.mse_loss(logit_real, self.disc(feats_pert).float())
            out["r1"] = r1.detach()
            out["loss"] = out["loss"] + self.r1_weight * r1
        return out

    def loss_generator(self, x0: Tensor, label: Tensor | None) -> dict:
        """f-distill's weighted DM loss (+ λ_GAN · GAN loss) at x_σ = G_θ(z) + σ ε; gradient only to θ."""
        t, sigma = self.sample_t_sigma(x0.shape[0], x0)
        x_t = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * torch.randn_like(x0)
        with torch.no_grad():
            x_teacher = self.teacher_denoise(x_t, sigma, label)
            x_fake = self.param.denoise(self.fake_net, x_t, sigma, label)
        out: dict[str, Tensor] = {}
        weight = None
        loss = torch.zeros((), device=x0.device)
        if self.disc is not None:
            # Gradient reaches θ through the frozen teacher's features only when the GAN term is on.
            with torch.set_grad_enabled(self.gan_weight > 0):
                logit = self.logits(x_t, sigma, label, detach_head=True).float()
            if self.gan_weight > 0:
                out["gan"] = gan_generator_loss(logit)
                loss = loss + self.gan_weight * out["gan"]
            if self.divergence.needs_ratio:
                weight, r = self.weights(logit, t)
                out["weight"], out["r"] = weight, r
                out["logit"] = logit.detach()
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
        # One generator forward per step; only generator steps keep its graph.
        with torch.set_grad_enabled(generator_step):
            x0 = self.generate(z, label)
        fake_loss = self.loss_fake_score(x0, label)
        total = fake_loss
        logs: dict[str, Tensor] = {"train/loss_fake": fake_loss.detach()}
        if self.disc is not None:
            d = self.loss_discriminator(x0, y, label, label)
            total = total + d["loss"]
            accuracy = 0.5 * ((d["logit_real"] > 0).float().mean() + (d["logit_fake"] < 0).float().mean())
            logs.update({"train/loss_disc": d["loss"].detach(), "train/disc_accuracy": accuracy})
            logs["train/logit_fake"] = d["logit_fake"].mean()
            logs["train/logit_real"] = d["logit_real"].mean()
            if "r1" in d:
                logs["train/r1"] = d["r1"]
            self._log_histograms(d["logit_fake"], d["logit_real"])
        if generator_step:
            g = self.loss_generator(x0, label)
            total = total + g["loss"]
            logs["train/loss_dm"] = g["dm"].detach()
            if "gan" in g:
                logs["train/loss_gan_gen"] = g["gan"].detach()
            if "weight" in g:
                logs.update(self._weight_stats(g["weight"], g["r"]))
        else:
            # Exactly-zero gradient for every generator parameter (DDP's reducer and ZeRO's buffers expect one).
            total = total + 0.0 * sum(p.reshape(-1)[:1].sum() for p in self.net.parameters())
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
        """Three named parameter groups for one optimizer (the frozen teacher and the EMA are not in it)."""
        groups = [
            {"params": list(self.net.parameters()), "name": "generator"},
            {"params": list(self.fake_net.parameters()), "name": "fake_score"},
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
        """θ_ema ← β θ_ema + (1 − β) θ with β = min(0.5^(1/half-life), (1 + k)/(10 + k)) after k generator updates
        (the warm-up of tf.train.ExponentialMovingAverage, so the teacher's initial weights fade quickly)."""
        if self.net_ema is None:
            return
        k = int(self.generator_updates)
        beta = min(0.5 ** (1.0 / self.ema_halflife_steps), (1 + k) / (10 + k))
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
