"""Evaluation: Fréchet distance with pluggable feature networks (raw values, lit_gen's digits classifier, local
Inception-v3 weights), precision/recall, Inception score, exact metrics of the built-in 2-D mixtures, a teacher's
ELBO and probability-flow NLL of the reference data (``likelihood``), and the loop
that samples a model at several step counts and scores it against reference shards (``lit-gen eval``).

Names are imported lazily (PEP 562), so ``lit_gen.eval.command`` can build the CLI parser without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FEATURES": "features",
    "default_features": "features",
    "feature_network": "features",
    "inception_weights_path": "features",
    "FrechetDistance": "metrics",
    "PrecisionRecall": "metrics",
    "frechet_distance": "metrics",
    "inception_score": "metrics",
    "mixture_of": "metrics",
    "read_reference": "reference",
    "LikelihoodOptions": "likelihood",
    "likelihood_scores": "likelihood",
    "METRICS": "runner",
    "Evaluator": "runner",
    "default_metrics": "runner",
    "evaluate": "runner",
    "format_table": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_gen.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lit_gen.eval.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
