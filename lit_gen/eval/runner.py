"""The evaluation loop: sample from a model at several step counts and score the samples against reference shards.

In-process API (what ``lit-gen eval``, the evaluation callback, benchmarks and pipelines call)::

    rows = evaluate("runs/toy2d/teacher/checkpoints/last.ckpt", "runs/data/toy2d_gmm8", steps=[1, 2, 4, 18])
    print(format_table(rows))

or, to score several models against one reference without recomputing its features::

    evaluator = Evaluator("runs/data/digits", metrics=["fd"])
    rows = evaluator.evaluate(teacher_path, steps=[1, 2, 4, 8, 18]) + evaluator.evaluate(student_path, steps=[1, 2])

A row is a flat dict: ``model, method, sampler, steps, nfe, n`` and one float per metric key (``METRICS``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_gen.data.builtin import mixture_metrics
from lit_gen.data.info import check_compatible, denormalize
from lit_gen.diffusion import SAMPLERS
from lit_gen.errors import LitGenError
from lit_gen.eval.features import default_features, feature_network
from lit_gen.eval.likelihood import LIKELIHOOD_METRICS, LikelihoodOptions, likelihood_scores
from lit_gen.eval.metrics import (
    ClassifierTwoSampleTest,
    FrechetDistance,
    PrecisionRecall,
    inception_score,
    mixture_of,
)
from lit_gen.eval.reference import read_reference
from lit_gen.export import LoadedModel, load_model

DEFAULT_MAX_N = 10_000
DEFAULT_MAX_REF = 50_000


@dataclass(frozen=True)
class MetricSpec:
    """One row of the metric table.

    Args:
        description: What it measures (shown in ``lit-gen eval --help``).
        features: Feature space: "default" (the data's, ``features.default_features``), a ``features.FEATURES`` name,
            or None (no features).
        keys: The row keys it fills.
    """

    description: str
    features: str | None
    keys: tuple[str, ...]


METRICS: dict[str, MetricSpec] = {
    "fd": MetricSpec(
        "Fréchet distance in the data's feature space: raw values (points), digits classifier (1x8x8 images), "
        "Inception-v3 (other images)",
        "default",
        ("fd",),
    ),
    "fd_raw": MetricSpec("Fréchet distance on the raw values (points; images as 0..255 pixels)", "raw", ("fd_raw",)),
    "fd_digits": MetricSpec("Fréchet distance on the digits classifier's features", "digits", ("fd_digits",)),
    "fid": MetricSpec("Fréchet Inception distance (local Inception-v3 weights)", "inception", ("fid",)),
    "mixture": MetricSpec(
        "exact mode metrics of a built-in 2-D mixture: mode-weight TV, off-mode mass, modes covered",
        None,
        ("mode_tv", "off_mode", "modes_covered"),
    ),
    "pr": MetricSpec(
        "precision / recall (k-NN manifolds, k=3) in the data's feature space", "default", ("precision", "recall")
    ),
    "is": MetricSpec(
        "Inception score with the data's classifier (digits classifier or Inception-v3)", "default", ("is",)
    ),
    "c2st": MetricSpec(
        "classifier two-sample test: cross-validated held-out accuracy of a small classifier (pixel CNN / point MLP) "
        "telling real from generated samples; 0.5 = indistinguishable",
        None,
        ("c2st",),
    ),
    "elbo": MetricSpec(
        "negative ELBO of the reference data (teachers; nats/dim in data units for points, bits/dim for images)",
        None,
        ("elbo",),
    ),
    "nll": MetricSpec(
        "exact NLL of the reference data by the probability-flow ODE (teachers; same units as elbo)", None, ("nll",)
    ),
}


FD_METRICS = ("fd", "fd_raw", "fd_digits", "fid")


def default_metrics(info: dict[str, Any]) -> list[str]:
    """``fd``, plus ``mixture`` when the shards come from a built-in 2-D mixture, plus ``c2st`` for images."""
    if mixture_of(info) is not None:
        return ["fd", "mixture"]
    return ["fd", "c2st"] if info.get("kind") == "image" else ["fd"]


def to_pixels(samples: torch.Tensor) -> torch.Tensor:
    """Generated images in 0..255 floats -> uint8, as a saved PNG (and the reference shards) would hold them."""
    return samples.round().clamp(0, 255).to(torch.uint8)


class Evaluator:
    """Scores samples against one reference shard folder; reference features are computed once, at construction.

    Args:
        ref: Reference shard folder written by ``lit-gen shards`` (or its ``dataset.json``).
        metrics: ``METRICS`` names (default: ``default_metrics``).
        n_ref: Use at most this many reference samples (default 50000; the first ones, a random subset).
        device: Where feature networks run.
        inception_weights: Path of the FID Inception weights (else ``$LIT_GEN_INCEPTION_WEIGHTS`` or the cache).
        seed: Seed of the Inception score's split shuffle.
        likelihood: settings of the ``elbo`` / ``nll`` metrics (``lit_gen.eval.likelihood.LikelihoodOptions``).
    """

    def __init__(
        self,
        ref: str | Path,
        metrics: Sequence[str] | None = None,
        n_ref: int | None = None,
        device: str | torch.device = "cpu",
        inception_weights: str | Path | None = None,
        seed: int = 0,
        likelihood: LikelihoodOptions | None = None,
    ) -> None:
        self.ref = str(ref)
        self.reference, self.reference_labels, self.info = read_reference(ref, n_ref or DEFAULT_MAX_REF)
        self.likelihood = likelihood
        self.device = torch.device(device)
        self.seed = seed
        self.mixture = mixture_of(self.info)
        self.metrics = list(dict.fromkeys(metrics or default_metrics(self.info)))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise LitGenError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if "mixture" in self.metrics and self.mixture is None:
            raise LitGenError(
                "the mixture metrics need shards of a built-in 2-D mixture (dataset.json source "
                f"builtin:toy2d:<name>); {self.ref} comes from {self.info.get('source')!r}"
            )
        self._networks: dict[tuple[str, bool], nn.Module] = {}
        self._inception_weights = inception_weights
        self._fd: dict[str, FrechetDistance] = {}
        self._pr: PrecisionRecall | None = None
        self._c2st: ClassifierTwoSampleTest | None = None
        for name in self.metrics:
            space = self._space(name)
            if name in FD_METRICS:
                self._fd[name] = FrechetDistance(self._network(space), self.device)
                self._fd[name].set_reference(self.reference)
            elif name == "pr":
                self._pr = PrecisionRecall(self._network(space), device=self.device)
                # k-NN radii cost O(N²): the first default_n() reference samples (the paper compares equal sizes).
                self._pr.set_reference(self.reference[: self.default_n()])
            elif name == "c2st":
                self._c2st = ClassifierTwoSampleTest(seed=seed, device=self.device)
                self._c2st.set_reference(self.reference)
            elif name == "is":
                self._network(space, logits=True)  # fail now, not after sampling, when the classifier is unavailable

    def to(self, device: str | torch.device) -> Evaluator:
        """Move the feature networks and the reference statistics to ``device``."""
        device = torch.device(device)
        if device != self.device:
            self.device = device
            for net in self._networks.values():
                net.to(device)
            for fd in self._fd.values():
                fd.to(device)
            if self._pr is not None:
                self._pr.to(device)
            if self._c2st is not None:
                self._c2st.to(device)
        return self

    def _space(self, name: str) -> str | None:
        space = METRICS[name].features
        return default_features(self.info) if space == "default" else space

    def _network(self, space: str, logits: bool = False) -> nn.Module:
        if (space, logits) not in self._networks:
            net = feature_network(space, self.info, self._inception_weights, logits=logits)
            self._networks[space, logits] = net.to(self.device)
        return self._networks[space, logits]

    @property
    def keys(self) -> list[str]:
        """Row keys of the configured metrics, in order."""
        return [key for name in self.metrics for key in METRICS[name].keys]

    def default_n(self) -> int:
        """Generated samples per evaluation: as many as reference samples, at most 10000."""
        return min(len(self.reference), DEFAULT_MAX_N)

    def check(self, data: dict[str, Any] | None, where: str) -> None:
        """Raise when a model's data (its description's ``data``) is not the reference's kind and shape.

        A latent model scores against latent shards of the same VAE (in latent space), or against image shards of
        its VAE's image shape (its samples decoded to pixels, ``decodes``)."""
        if data is None:
            raise LitGenError(f"{where} has no data description; cannot check it against {self.ref}")
        if self.decodes(data):
            image_shape = [int(s) for s in data["vae"]["image_shape"]]
            if image_shape != [int(s) for s in self.info["shape"]]:
                raise LitGenError(
                    f"{where} decodes to images {image_shape}, but {self.ref} holds images {self.info['shape']}"
                )
            return
        mine = (self.info["kind"], [int(s) for s in self.info["shape"]])
        theirs = (data.get("kind"), [int(s) for s in data.get("shape", [])])
        if mine != theirs:
            raise LitGenError(f"{where} generates {theirs[0]} {theirs[1]}, but {self.ref} holds {mine[0]} {mine[1]}")
        if mine[0] == "latent":
            check_compatible(data, self.info, where)

    def decodes(self, data: dict[str, Any]) -> bool:
        """Whether a model of ``data`` is scored on its decoded images (a latent model against pixel shards)."""
        return data.get("kind") == "latent" and self.info["kind"] == "image"

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """Every configured metric of ``samples`` (data units, as ``LoadedModel.sample`` returns them).

        Non-finite samples (a diverged model) give NaN for every metric instead of an exception.
        """
        if samples.shape[0] < 4:
            raise LitGenError(f"evaluation needs at least 4 generated samples, got {samples.shape[0]}")
        if not torch.isfinite(samples).all():
            return {key: math.nan for key in self.keys}
        x = to_pixels(samples) if self.info["kind"] == "image" else samples.float()
        out: dict[str, float] = {}
        for name in self.metrics:
            if name in self._fd:
                out[name] = self._fd[name](x)
            elif name == "pr":
                out.update(self._pr(x))
            elif name == "c2st":
                out["c2st"] = self._c2st(x)
            elif name == "is":
                out["is"] = inception_score(self._network(self._space(name), logits=True), x, seed=self.seed)
            elif name == "mixture":
                stats = mixture_metrics(x.numpy(), self.mixture)
                out.update({key: float(stats[key]) for key in METRICS["mixture"].keys})
        return out

    def score_real(self, shards: str | Path, n: int | None = None, name: str = "real train split") -> dict[str, Any]:
        """The real-data floor: the first ``n`` samples of other real shards (e.g. the training split) scored like a
        model's samples against the reference, as one row (``method`` "data"). A saturated metric shows here: a
        model cannot be told from the data better than the data's own other split."""
        n = n or self.default_n()
        real, _, info = read_reference(shards, n)
        self.check({"kind": info["kind"], "shape": info["shape"]}, str(shards))
        row: dict[str, Any] = {"model": name, "method": "data", "sampler": "-", "steps": 0, "nfe": 0, "n": len(real)}
        row.update(self.score(real.float()))
        return row

    def evaluate(
        self,
        model: str | Path | LoadedModel,
        steps: Sequence[int | None] | None = None,
        n: int | None = None,
        seed: int = 0,
        sampler: str | None = None,
        weights: str = "ema",
        name: str | None = None,
        device: str | torch.device | None = None,
        guidance: float | None = None,
        allow_extrapolation: bool = False,
    ) -> list[dict[str, Any]]:
        """Sample ``n`` points from ``model`` at each step count and score them: one row per step count.

        Args:
            model: A ``.ckpt``/``.safetensors`` path or a ``LoadedModel``.
            steps: Step counts (None entries / None: the model's default). Students with a σ grid use their own grid.
            n: Generated samples per row (default ``default_n``).
            seed: Noise seed (the same for every row, so rows differ only by the step count).
            sampler: Sampler name (default: the model's).
            weights: "ema" or "raw" (paths only).
            name: The ``model`` column (default: the path; "model" for a ``LoadedModel``).
            device: Where to sample (default: the evaluator's device). A ``LoadedModel``'s network is moved there.
            guidance: guidance weight w (``LoadedModel.sample``; None = 1); a row gets a ``guidance`` column when set.
            allow_extrapolation: let a w-conditioned student run outside its trained w range.
        """
        if isinstance(model, LoadedModel):
            loaded, where = model, name or "model"
        else:
            loaded, where = load_model(model, weights=weights), name or str(model)
        self.check(loaded.description.get("data"), where)
        n = n or self.default_n()
        defaults = loaded.description.get("sampling", {})
        # Likelihood metrics score the reference under the model: once per model, the same in every row.
        wanted = [m for m in self.metrics if m in LIKELIHOOD_METRICS]
        likelihood = {}
        decode = self.decodes(loaded.data_info)
        if wanted and decode:
            raise LitGenError(f"{', '.join(wanted)} of a latent model need latent reference shards (--encode)")
        if wanted:
            likelihood = likelihood_scores(
                loaded,
                self.reference[:n],
                self.reference_labels[:n] if self.info.get("num_classes") else None,
                wanted,
                options=self.likelihood,
                seed=seed,
                device=device or self.device,
                where=where,
            )
        sampled = any(m not in LIKELIHOOD_METRICS for m in self.metrics)
        rows = []
        for k in list(steps) if steps else [None]:
            k_used = int(k or defaults.get("steps", 18))
            sampler_used = sampler or defaults.get("sampler", "heun")
            samples = None
            if sampled:
                samples = loaded.sample(
                    n,
                    steps=k_used,
                    sampler=sampler_used,
                    seed=seed,
                    device=device or self.device,
                    guidance=guidance,
                    allow_extrapolation=allow_extrapolation,
                    raw=not decode,
                )
                samples = samples if decode else denormalize(samples, loaded.data_info)  # latents stay latents
            row: dict[str, Any] = {
                "model": where,
                "method": loaded.description.get("method", "?"),
                "sampler": sampler_used,
                "steps": k_used,
                "nfe": SAMPLERS[sampler_used].nfe(k_used),
                "n": n,
            }
            if guidance is not None:
                row["guidance"] = float(guidance)
            if samples is not None:
                row.update(self.score(samples))
            row.update(likelihood)
            rows.append(row)
        return rows


def evaluate(
    model_path: str | Path,
    ref_shards: str | Path,
    metrics: Sequence[str] | None = None,
    steps: Sequence[int | None] | None = None,
    n: int | None = None,
    seed: int = 0,
    sampler: str | None = None,
    weights: str = "ema",
    n_ref: int | None = None,
    device: str = "cpu",
    inception_weights: str | Path | None = None,
    likelihood: LikelihoodOptions | None = None,
) -> list[dict[str, Any]]:
    """Score one model file against reference shards (see ``Evaluator`` and ``Evaluator.evaluate``)."""
    evaluator = Evaluator(
        ref_shards,
        metrics,
        n_ref=n_ref,
        device=device,
        inception_weights=inception_weights,
        seed=seed,
        likelihood=likelihood,
    )
    return evaluator.evaluate(model_path, steps=steps, n=n, seed=seed, sampler=sampler, weights=weights)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


ROW_HEAD = ("model", "method", "sampler", "steps", "nfe")


def format_table(rows: Sequence[dict[str, Any]], header: bool = True) -> str:
    """Markdown table: model, method, sampler, steps, NFE, then every metric key in the rows (in first-seen order)."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in (*ROW_HEAD, "n")]
    columns = [*ROW_HEAD, "n", *keys]
    titles = ["NFE" if c == "nfe" else c for c in columns]
    lines = []
    if header:
        lines += ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
