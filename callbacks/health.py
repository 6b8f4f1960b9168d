"""Training health: read the values a method logs (``trainer.callback_metrics``) and, past a threshold, warn ONCE with
a sentence a user understands — so a distillation that silently degrades shows up while it runs, not in the final
metrics. Each warning goes to stderr, to ``<default_root_dir>/health.txt`` (shown by ``lit-gen report``) and to
TensorBoard as text; the signals themselves are already scalars in TensorBoard.

Signals (a check is skipped when its keys are not logged, so the callback is on for every fit):
- f-distill discriminator at chance: ``train/disc_accuracy`` (or the mean of ``train/disc_acc_real`` and
  ``train/disc_acc_fake``) averaged over the last ``window`` steps at most ``chance_accuracy`` after ``warmup_steps``.
  A head at chance gives r ≈ 1: the f-divergence weights go flat and the GAN term pushes nowhere. Measured on the
  toy2d f-distill recipe (batch 256, steps 100-200): a training head averages 0.54 (its noisy inputs up to σ ≈ 6 are
  often indistinguishable), a head frozen at initialisation 0.50; hence the default 0.52 over a 50-step window.
- f-distill fake score lagging: ``train/loss_fake`` (its denoising loss on the student's samples) averaged over the
  window grew past ``fake_loss_factor`` × its average over the first window: the fake score no longer tracks the
  student's density, so the distribution-matching gradient D_φ − D_T is stale.
- f-distill weight concentration: ``train/weight_max`` (weights normalised to batch mean 1) above ``max_weight``
  on average: a few samples carry the generator's gradient (r's spread is extreme; ``train/ratio_std`` when logged).
- every method, collapse: an in-run probe logged by ``callbacks.evaluate.Evaluate`` (``eval/recall*``,
  ``eval/modes_covered*``) fell below ``collapse_fraction`` × its best value so far.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

HEALTH_FILE = "health.txt"


class TrainingHealth(Callback):
    """Warn once per problem when logged training signals cross their thresholds (see the module docstring).

    Args:
        window: steps averaged for each signal (single steps are noisy).
        warmup_steps: no warning before this optimizer step (critics start untrained).
        chance_accuracy: the discriminator counts as at chance at or below this mean accuracy.
        fake_loss_factor: the fake score lags when its loss exceeds this multiple of its starting value.
        max_weight: f-distill weights (batch mean 1) whose mean maximum exceeds this are concentrated.
        collapse_fraction: a coverage probe below this fraction of its best value so far is a collapse.
    """

    def __init__(
        self,
        window: int = 50,
        warmup_steps: int = 100,
        chance_accuracy: float = 0.52,
        fake_loss_factor: float = 3.0,
        max_weight: float = 20.0,
        collapse_fraction: float = 0.7,
    ) -> None:
        self.window = max(int(window), 1)
        self.warmup_steps = int(warmup_steps)
        self.chance_accuracy = float(chance_accuracy)
        self.fake_loss_factor = float(fake_loss_factor)
        self.max_weight = float(max_weight)
        self.collapse_fraction = float(collapse_fraction)
        self.recent: dict[str, deque[float]] = {}
        self.start: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.warned: dict[str, str] = {}  # problem -> sentence, saved in the checkpoint: once per run, also resumed

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"warned": dict(self.warned), "start": dict(self.start), "best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = dict(state_dict.get("warned", {}))
        self.start = dict(state_dict.get("start", {}))
        self.best = dict(state_dict.get("best", {}))

    # ------------------------------------------------------------------------------------------------ signals
    def _mean(self, key: str) -> float | None:
        values = self.recent.get(key)
        if not values or len(values) < self.window:
            return None
        return sum(values) / len(values)

    def _record(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            scalar = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
            if not scalar:
                continue
            value = float(value)
            if value != value:  # NaN: the non-finite guard's business
                continue
            values = self.recent.setdefault(key, deque(maxlen=self.window))
            values.append(value)
            if len(values) == self.window and key not in self.start:
                self.start[key] = sum(values) / len(values)

    def problems(self) -> dict[str, str]:
        """Problems the recorded signals show now: name -> sentence."""
        found: dict[str, str] = {}
        accuracy = self._mean("train/disc_accuracy")
        real, fake = self._mean("train/disc_acc_real"), self._mean("train/disc_acc_fake")
        if real is not None and fake is not None:
            accuracy = 0.5 * (real + fake)
        if accuracy is not None and accuracy <= self.chance_accuracy:
            split = "" if real is None or fake is None else f" (real {real:.2f}, generated {fake:.2f})"
            found["discriminator_at_chance"] = (
                f"the discriminator is at chance: it tells real from generated samples {accuracy:.1%} of the time"
                f"{split} over the last {self.window} steps, so the density ratio r is ~1 and the f-divergence "
                "weights and GAN term carry no signal. If samples still look wrong, the discriminator is not "
                "learning: check its learning rate (disc_lr_scale) and gan_weight."
            )
        fake_loss, fake_start = self._mean("train/loss_fake"), self.start.get("train/loss_fake")
        if fake_loss is not None and fake_start and fake_loss > self.fake_loss_factor * fake_start:
            found["fake_score_lagging"] = (
                f"the fake score lags the student: its loss is {fake_loss:.3g}, {fake_loss / fake_start:.1f}x its "
                f"value at the start ({fake_start:.3g}), so the distribution-matching gradient is stale. Give the "
                "fake score more updates (update_ratio) or a larger learning rate (fake_lr_scale)."
            )
        weight_max = self._mean("train/weight_max")
        if weight_max is not None and weight_max > self.max_weight:
            spread = self._mean("train/ratio_std")
            extra = "" if spread is None else f" (spread of r: std {spread:.3g})"
            found["weights_concentrated"] = (
                f"the f-divergence weights are concentrated: the largest is {weight_max:.1f}x the batch mean on "
                f"average{extra}, so a few samples carry the generator's gradient. Consider a smaller ratio_max "
                "or logit_clip, or the js / softened_rkl divergence."
            )
        for key, best in self.best.items():
            now = self.recent.get(key)
            if now and best > 0 and now[-1] < self.collapse_fraction * best:
                found[f"collapse:{key}"] = (
                    f"possible mode collapse: {key} fell to {now[-1]:.3g} from its best {best:.3g} in this run: the "
                    "samples cover less of the data than they did. Look at the sample grids; an earlier checkpoint "
                    "may be better."
                )
        return found

    def _warn(self, trainer: Trainer, name: str, sentence: str) -> None:
        self.warned[name] = sentence
        if trainer.global_rank != 0:
            return
        print(f"lit-gen: warning at step {trainer.global_step}: {sentence}", file=sys.stderr, flush=True)
        path = Path(trainer.default_root_dir) / HEALTH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as file:
            file.write(f"step {trainer.global_step}: {sentence}\n")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text(f"health/{name}", sentence, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "eval/"))}
        self._record({k: v for k, v in metrics.items() if k.startswith("train/")})
        # Coverage probes are logged once per evaluation: track their best and the latest value only.
        for key, value in metrics.items():
            if key.startswith(("eval/recall", "eval/modes_covered")) and isinstance(value, (float, torch.Tensor)):
                value = float(value)
                self.recent[key] = deque([value], maxlen=1)
                self.best[key] = max(self.best.get(key, value), value)
        if trainer.global_step < self.warmup_steps:
            return
        for name, sentence in self.problems().items():
            if name not in self.warned:
                self._warn(trainer, name, sentence)
