"""Built-in datasets that need no download: 2-D Gaussian mixtures with known modes, and scikit-learn's digits.

The toy mixtures are a named table (``TOY2D``) so recipes and tests can say ``builtin:toy2d:gmm8``. Every mixture has
unequal mode weights on purpose: a generator that covers every mode but with the wrong frequencies (the classic
failure of mode-seeking one-step students) shows up in ``mixture_metrics``'s ``mode_tv``, not only in ``off_mode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mixture2D:
    """A 2-D mixture of isotropic Gaussians.

    Args:
        means: Centre ``(x, y)`` of each mode.
        stds: Standard deviation of each mode (the same along both axes).
        weights: Probability of each mode; must sum to 1.
    """

    means: tuple[tuple[float, float], ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        k = len(self.means)
        if k == 0 or len(self.stds) != k or len(self.weights) != k:
            raise ValueError(
                f"Mixture2D needs as many stds and weights as means, got {k}/{len(self.stds)}/{len(self.weights)}"
            )
        if any(len(m) != 2 for m in self.means):
            raise ValueError("Mixture2D means must be (x, y) pairs")
        if any(s <= 0 for s in self.stds) or any(w < 0 for w in self.weights):
            raise ValueError("Mixture2D stds must be positive and weights non-negative")
        if not math.isclose(sum(self.weights), 1.0, abs_tol=1e-9):
            raise ValueError(f"Mixture2D weights must sum to 1, they sum to {sum(self.weights)}")

    @property
    def num_modes(self) -> int:
        return len(self.means)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.asarray(self.means, dtype=np.float64),
            np.asarray(self.stds, dtype=np.float64),
            np.asarray(self.weights, dtype=np.float64),
        )

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` points; the same ``seed`` gives the same points.

        Args:
            n: Number of points.
            seed: Seed of the numpy generator.

        Returns:
            ``(points, modes)``: float32 array ``(n, 2)`` and the int64 index ``(n,)`` of the mode each came from.
        """
        means, stds, weights = self._arrays()
        rng = np.random.default_rng(seed)
        modes = rng.choice(self.num_modes, size=n, p=weights)
        points = means[modes] + stds[modes, None] * rng.standard_normal((n, 2))
        return points.astype(np.float32), modes.astype(np.int64)

    def log_prob(self, points: np.ndarray) -> np.ndarray:
        """Exact log density of the mixture.

        Args:
            points: Array ``(n, 2)`` (anything ``np.asarray`` accepts, e.g. a CPU tensor).

        Returns:
            float64 array ``(n,)``.
        """
        means, stds, weights = self._arrays()
        x = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (n, K)
        log_comp = np.log(weights) - 2.0 * np.log(stds) - math.log(2.0 * math.pi) - 0.5 * sq / stds**2
        top = log_comp.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(log_comp - top).sum(axis=1, keepdims=True)))[:, 0]

    def assign(self, points: np.ndarray, k_sigma: float = 3.0) -> np.ndarray:
        """Index of the nearest mode (in Mahalanobis distance ``|x - mean| / std``) within ``k_sigma``, else -1.

        For a 2-D isotropic Gaussian the fraction of its own samples within ``k`` sigmas is ``1 - exp(-k²/2)``
        (98.9 % at the default 3), so even perfect samples have ~1 % off-mode points.

        Args:
            points: Array ``(n, 2)``.
            k_sigma: Largest Mahalanobis distance that still counts as on a mode.

        Returns:
            int64 array ``(n,)`` of mode indices, -1 for off-mode points.
        """
        means, stds, _ = self._arrays()
        x = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        dist = np.sqrt(((x[:, None, :] - means[None]) ** 2).sum(-1)) / stds  # (n, K)
        nearest = dist.argmin(axis=1)
        on_mode = dist[np.arange(len(x)), nearest] <= k_sigma
        return np.where(on_mode, nearest, -1).astype(np.int64)


def mixture_metrics(points: np.ndarray, mixture: Mixture2D, k_sigma: float = 3.0) -> dict:
    """Mode statistics of generated points against the true mixture.

    Args:
        points: Generated points ``(n, 2)`` in data units (denormalised).
        mixture: The mixture they should follow.
        k_sigma: Passed to ``Mixture2D.assign``.

    Returns:
        ``{"mode_tv": total variation between the mode frequencies among on-mode points and the true weights
        (1.0 when no point is on a mode), "off_mode": fraction of points on no mode, "modes_covered": number of modes
        holding at least max(5, 1 % of their expected count) points, "num_modes": K}``.
    """
    labels = mixture.assign(points, k_sigma)
    n = len(labels)
    weights = np.asarray(mixture.weights, dtype=np.float64)
    counts = np.bincount(labels[labels >= 0], minlength=mixture.num_modes)
    on = int(counts.sum())
    mode_tv = 0.5 * float(np.abs(counts / on - weights).sum()) if on else 1.0
    needed = np.maximum(5.0, 0.01 * n * weights)
    return {
        "mode_tv": mode_tv,
        "off_mode": 1.0 - on / n if n else 1.0,
        "modes_covered": int((counts >= needed).sum()),
        "num_modes": mixture.num_modes,
    }


def _gmm8() -> Mixture2D:
    angles = [2.0 * math.pi * k / 8 for k in range(8)]
    return Mixture2D(
        means=tuple((round(4.0 * math.cos(a), 12), round(4.0 * math.sin(a), 12)) for a in angles),
        stds=(0.15,) * 8,
        weights=tuple(k / 36.0 for k in range(1, 9)),  # 1..8, normalised
    )


def _grid9() -> Mixture2D:
    return Mixture2D(
        means=tuple((3.0 * i, 3.0 * j) for j in (-1, 0, 1) for i in (-1, 0, 1)),
        stds=(0.2,) * 9,
        weights=tuple(k / 45.0 for k in range(1, 10)),  # 1..9, normalised
    )


TOY2D: dict[str, Mixture2D] = {
    # 8 modes on a circle of radius 4, weights proportional to 1..8.
    "gmm8": _gmm8(),
    # 3x3 grid with spacing 3, weights proportional to 1..9.
    "grid9": _grid9(),
    # Irregular positions, weights and widths: meant for held-out evaluation, never for tuning.
    "gmm5_heldout": Mixture2D(
        means=((-2.5, 1.8), (1.2, 2.9), (3.1, -0.7), (-0.4, -2.6), (-3.4, -1.9)),
        stds=(0.25, 0.1, 0.3, 0.15, 0.2),
        weights=(0.35, 0.25, 0.2, 0.12, 0.08),
    ),
}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped inside scikit-learn: no download).

    Returns:
        ``(images, labels)``: uint8 ``(N, 1, 8, 8)`` with the 0..16 intensities scaled to 0..255 (``round(v*255/16)``),
        and int64 ``(N,)`` digit classes 0..9.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # scikit-learn is slow to import: only when asked

    digits = _sk_load_digits()
    images = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images[:, None], np.asarray(digits.target, dtype=np.int64)
