"""Periodic evaluation during training: every N optimizer steps (and at the last step), sample from the current
weights — the EMA when the run keeps one — score the samples against reference shards with ``lit_gen.eval`` and log
the numbers (``eval/<metric>_<K>step``, e.g. ``eval/fd_1step``) to TensorBoard (and ``pl_module.log``).

The reference features are computed once, at the first evaluation, and kept. Evaluation runs on rank 0 only.
"""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.ema import EMA
from lit_gen.export import LoadedModel


class Evaluate(Callback):
    """Score samples of the model being trained against reference shards at a fixed interval.

    Args:
        ref: Reference shard folder (``lit-gen shards``); typically held-out data of the training distribution.
        every_n_steps: Interval in optimizer steps; the last step (``trainer.max_steps``) is evaluated too.
        metrics: ``lit_gen.eval.METRICS`` names (default: fd, plus mixture for built-in 2-D mixtures).
        steps: Sampler step counts, one logged set each (None: the method's default, logged without a suffix).
        n: Generated samples per evaluation.
        n_ref: Reference samples to use (default: all, at most 50000).
        sampler: Sampler name (None: the method's default).
        seed: Noise seed, fixed so evaluations differ only by the weights.
        inception_weights: Path of the FID Inception weights (only for fid / Inception features).
    """

    def __init__(
        self,
        ref: str,
        every_n_steps: int = 1000,
        metrics: list[str] | None = None,
        steps: list[int] | None = None,
        n: int = 2000,
        n_ref: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        inception_weights: str | None = None,
    ) -> None:
        self.ref = ref
        self.every_n_steps = every_n_steps
        self.metrics = metrics
        self.steps = steps
        self.n = n
        self.n_ref = n_ref
        self.sampler = sampler
        self.seed = seed
        self.inception_weights = inception_weights
        self._evaluator: Any = None
        self._last_step = -1
        self.last: dict[str, float] = {}  # the latest logged values (also handy in tests and scripts)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self._get_evaluator(pl_module)  # bad reference / metric names fail before the first step

    def _get_evaluator(self, pl_module: LightningModule) -> Any:
        """The evaluator, on the module's current device (``setup`` runs before the module is moved to it)."""
        if self._evaluator is None:
            from lit_gen.eval.runner import Evaluator

            self._evaluator = Evaluator(
                self.ref,
                self.metrics,
                n_ref=self.n_ref,
                device=pl_module.device,
                inception_weights=self.inception_weights,
                seed=self.seed,
            )
        return self._evaluator.to(pl_module.device)

    @staticmethod
    def _weights(trainer: Trainer, pl_module: LightningModule) -> Any:
        """Context giving the network to sample from: the method's own inference EMA (``ema_prefix``), the EMA
        callback's average swapped into ``net``, or ``net`` itself."""
        prefix = (pl_module.describe().get("ema_prefix") or "").rstrip(".")
        if prefix and isinstance(getattr(pl_module, prefix, None), type(pl_module.net)):
            return contextlib.nullcontext(getattr(pl_module, prefix))
        for callback in trainer.callbacks:
            if isinstance(callback, EMA) and callback.target == "net":
                return callback.averaged(pl_module)
        return contextlib.nullcontext(pl_module.net)

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        from lit_gen.scale.fsdp import full_network, is_sharded

        if not trainer.is_global_zero:  # rank 0 evaluates; under FSDP every rank gathers the weights (full_network)
            if is_sharded(pl_module.net):
                with self._weights(trainer, pl_module) as averaged, full_network(averaged):
                    pass
            return {}
        evaluator = self._get_evaluator(pl_module)
        evaluator.check(getattr(pl_module, "data_info", None), f"the {type(pl_module).__name__} being trained")
        values: dict[str, float] = {}
        with self._weights(trainer, pl_module) as averaged, full_network(averaged) as net:
            was_training = net.training
            model = LoadedModel(net=net, param=pl_module.param, description=pl_module.describe())
            try:
                rows = evaluator.evaluate(
                    model, steps=self.steps, n=self.n, seed=self.seed, sampler=self.sampler, device=pl_module.device
                )
            finally:
                net.train(was_training)
        for k, row in zip(self.steps or [None], rows, strict=True):
            suffix = f"_{row['steps']}step" if k is not None else ""
            for key in evaluator.keys:
                values[f"eval/{key}{suffix}"] = float(row[key])
        return values

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        last = trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps
        if step == self._last_step or not (due or last):
            return
        self._last_step = step
        values = self._evaluate(trainer, pl_module) or {}
        self.last = values
        if not values:  # ranks other than 0
            return
        # ``pl_module.log`` puts the values in ``trainer.callback_metrics`` (ModelCheckpoint can monitor them); the
        # loggers get them directly: ``pl_module.log``'s step metrics reach the logger only on steps that are
        # multiples of ``trainer.log_every_n_steps``, which the evaluation interval need not be.
        for name, value in values.items():
            pl_module.log(name, value, logger=False, rank_zero_only=True, on_step=True, on_epoch=False)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
