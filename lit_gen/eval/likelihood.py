"""``--metric elbo`` and ``--metric nll``: a teacher's likelihood of the reference data, in the data's own units.

The maths is ``lit_gen.diffusion.likelihood`` (negative ELBO of VDM; exact NLL through the probability-flow ODE),
evaluated in the model's training space x = (raw − shift) / scale (``lit_gen.data.info``) and converted back with
the normalisation's Jacobian, log p_raw(raw) = log p_x(x) − D log(scale):

- points: nats per dimension in the data's own units, (NLL_x / D) + log(scale). Scaling the data by c (shards
  written from c·X) multiplies ``scale`` by c and shifts the value by exactly log c.
- images: bits per dimension on the 8-bit scale (DDPM's and VDM's convention), with uniform dequantisation:
  v = raw + u − ½, u ~ U[0, 1)^D, so that −log P(raw) ≤ E_u[−log p_v(v)] (Theis et al. 2016; Ho et al. 2020 §4),
  reported as ((NLL_x / D) + log(scale)) / ln 2.

A class-conditional teacher is scored with the reference labels: log p(x | label). Students (few-step networks on a
fixed σ grid, one-step generators) have no denoiser at every noise level, hence no score and no density: refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lit_gen.data.info import normalize
from lit_gen.diffusion.likelihood import SOLVERS, TRACES, negative_elbo, pf_ode_nll
from lit_gen.errors import LitGenError
from lit_gen.export import LoadedModel

LIKELIHOOD_METRICS = ("elbo", "nll")
SCORE_METHODS = ("teacher",)
"""Methods whose network is a denoiser at every noise level (a score model); everything else is a student."""


@dataclass(frozen=True)
class LikelihoodOptions:
    """Settings of the likelihood metrics.

    Args:
        steps: fixed solver steps of the probability-flow ODE (equal in ln σ).
        solver: "rk4" (4 NFE per step) or "heun" (2 NFE per step).
        trace: "exact", "hutchinson" or "auto" (exact up to 16 dimensions).
        n_lambda: λ draws per sample of the ELBO's diffusion term.
        seed: the likelihood's own seed (dequantisation, ELBO noise, Hutchinson probes); None: the eval seed.
        sigma_min: data end of both bounds (default: the model's sampling σ_min).
        sigma_max: prior end (default: the model's sampling σ_max).
        batch_size: reference samples per forward batch.
    """

    steps: int = 32
    solver: str = "rk4"
    trace: str = "auto"
    n_lambda: int = 32
    seed: int | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    batch_size: int = 2048

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise LitGenError(f"--likelihood-steps must be at least 1, got {self.steps}")
        if self.solver not in SOLVERS:
            raise LitGenError(f"unknown ODE solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.trace not in TRACES:
            raise LitGenError(f"unknown --trace {self.trace!r}; choose one of {', '.join(TRACES)}")
        if self.n_lambda < 1 or self.batch_size < 1:
            raise LitGenError("n_lambda and batch_size must be at least 1")


def check_density(model: LoadedModel, where: str) -> None:
    """Raise unless ``model`` is a score model (a teacher) whose likelihood is defined."""
    description = model.description
    method = description.get("method", "?")
    if method not in SCORE_METHODS or description.get("sampling", {}).get("grid") is not None:
        raise LitGenError(
            f"--metric elbo/nll need a teacher (a denoiser at every noise level, i.e. a score); {where} is a "
            f"'{method}' student, which has no score function and no density"
        )


def unit_of(info: dict[str, Any]) -> str:
    """The unit of the values: "bits/dim" for images (8-bit scale), "nats/dim" for points (data units)."""
    return "bits/dim" if info["kind"] == "image" else "nats/dim"


def to_model_space(raw: torch.Tensor, info: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Reference data (uint8 images / points in data units) -> float64 model-space tensor; images dequantised."""
    raw = raw.double()
    if info["kind"] == "image":
        raw = raw + torch.rand(raw.shape, generator=generator, dtype=torch.float64) - 0.5
    return normalize(raw, info).double()


def per_dim_in_data_units(nll_model: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """Nats per sample in model space -> nats/dim in data units (points) or bits/dim on the 8-bit scale (images)."""
    dim = math.prod(int(s) for s in info["shape"])
    per_dim = nll_model / dim + math.log(float(info["normalize"]["scale"]))
    return per_dim / math.log(2.0) if info["kind"] == "image" else per_dim


def likelihood_scores(
    model: LoadedModel,
    raw: torch.Tensor,
    labels: torch.Tensor | None,
    metrics: list[str] | tuple[str, ...],
    *,
    options: LikelihoodOptions | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    where: str = "model",
) -> dict[str, float]:
    """Mean ``elbo`` / ``nll`` of the reference samples ``raw`` under ``model`` (units: ``unit_of``).

    Args:
        model: a loaded teacher.
        raw: reference samples as ``read_reference`` returns them (uint8 images or float points).
        labels: their class labels (used when the model is class-conditional).
        metrics: which of ``LIKELIHOOD_METRICS`` to compute.
        options: solver / estimator settings.
        seed: the evaluation seed (used when ``options.seed`` is None).
        device: where the network runs.
        where: the model's name, for error messages.
    """
    check_density(model, where)
    options = options or LikelihoodOptions()
    info = model.data_info
    sigma_min = options.sigma_min if options.sigma_min is not None else float(model.param.sigma_min)
    sigma_max = options.sigma_max if options.sigma_max is not None else float(model.param.sigma_max)
    if model.num_classes and labels is None:
        raise LitGenError(f"{where} is class-conditional; its likelihood needs reference shards with labels")
    generator = torch.Generator().manual_seed(options.seed if options.seed is not None else seed)
    device = torch.device(device)
    model.net.to(device).eval()
    denoiser = model.denoiser()
    x_all = to_model_space(raw, info, generator)
    totals = {name: [] for name in metrics}
    for start in range(0, len(x_all), options.batch_size):
        x = x_all[start : start + options.batch_size].to(device)
        label = None
        if model.num_classes:
            label = labels[start : start + options.batch_size].to(device)
            if int(label.max()) >= model.num_classes:
                raise LitGenError(f"the reference labels go up to {int(label.max())}; {where} has {model.num_classes}")

        def run(x_in: torch.Tensor, sigma: torch.Tensor, lab: torch.Tensor | None) -> torch.Tensor:
            # The network runs in float32 (its weights' dtype); the bookkeeping stays in float64.
            return denoiser(x_in.float(), sigma.float(), lab).double()

        if "elbo" in metrics:
            with torch.no_grad():
                value = negative_elbo(
                    run, x, label, sigma_min=sigma_min, sigma_max=sigma_max, n_lambda=options.n_lambda,
                    generator=generator,
                )  # fmt: skip
            totals["elbo"].append(value.cpu())
        if "nll" in metrics:
            value = pf_ode_nll(
                run, x, label, sigma_min=sigma_min, sigma_max=sigma_max, steps=options.steps, solver=options.solver,
                trace=options.trace, generator=generator,
            )  # fmt: skip
            totals["nll"].append(value.cpu())
    return {name: float(per_dim_in_data_units(torch.cat(values), info).mean()) for name, values in totals.items()}
