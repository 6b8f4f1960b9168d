"""Sample-quality metrics on tensors (no files, no models): Fréchet distance, precision/recall, Inception score, and
the exact mode metrics of the built-in 2-D mixtures.

The Fréchet distance is torchmetrics' ``FrechetInceptionDistance`` with a pluggable feature network
(``features.py``); precision/recall is written here because torchmetrics has none.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from lit_gen.data.builtin import TOY2D, Mixture2D

BATCH = 500


def batches(x: torch.Tensor, size: int = BATCH) -> Iterable[torch.Tensor]:
    """Consecutive slices of ``x`` along dim 0."""
    for start in range(0, x.shape[0], size):
        yield x[start : start + size]


class FrechetDistance:
    """Fréchet distance between Gaussian fits of feature sets (Heusel et al. 2017, eq. 6 / Dowson & Landau 1982):
    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}), computed by torchmetrics in float64.

    The reference statistics are computed once (``set_reference``) and kept across ``__call__``s.

    Args:
        feature: The feature network (``features.feature_network``); must have ``num_features``.
        device: Where features are computed.
    """

    def __init__(self, feature: nn.Module, device: str | torch.device = "cpu") -> None:
        self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(device)
        self.device = torch.device(device)

    def to(self, device: str | torch.device) -> FrechetDistance:
        """Move the feature network and the accumulated statistics."""
        self.device = torch.device(device)
        self.metric = self.metric.to(self.device)
        return self

    @torch.no_grad()
    def set_reference(self, real: torch.Tensor) -> None:
        """Accumulate the reference set's feature mean and covariance (replaces an earlier reference)."""
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        for chunk in batches(real):
            self.metric.update(chunk.to(self.device), real=True)

    @torch.no_grad()
    def __call__(self, fake: torch.Tensor) -> float:
        """FD between the reference and ``fake`` (at least 2 samples each)."""
        self.metric.reset()  # drops the previous fake statistics, keeps the reference
        for chunk in batches(fake):
            self.metric.update(chunk.to(self.device), real=False)
        return float(self.metric.compute())


def frechet_distance(a: torch.Tensor, b: torch.Tensor, feature: nn.Module | None = None) -> float:
    """One-shot Fréchet distance between two sets (default features: the flattened values themselves)."""
    from lit_gen.eval.features import RawFeatures

    fd = FrechetDistance(feature if feature is not None else RawFeatures(a.shape[1:]))
    fd.set_reference(a)
    return fd(b)


def _kth_nn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``x`` to its k-th nearest other row."""
    radii = []
    for chunk in batches(x, 1000):
        d = torch.cdist(chunk, x)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Boolean per row of ``points``: within ``radii[j]`` of some ``centres[j]``."""
    hits = []
    for chunk in batches(points, 1000):
        hits.append((torch.cdist(chunk, centres) <= radii[None]).any(dim=1))
    return torch.cat(hits)


class PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1–2): the manifold of a set is the union of balls
    around its points with radius = distance to the k-th nearest neighbour; precision = fraction of generated points
    inside the real manifold, recall = fraction of real points inside the generated manifold (paper: k = 3).

    Args:
        feature: Feature network (as for the FD); distances are Euclidean in its output space.
        k: Neighbourhood size.
        device: Where features and distances are computed.
    """

    def __init__(self, feature: nn.Module, k: int = 3, device: str | torch.device = "cpu") -> None:
        self.feature = feature.to(device)
        self.k = k
        self.device = torch.device(device)
        self.real: torch.Tensor | None = None
        self.real_radii: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> PrecisionRecall:
        """Move the feature network and the reference features."""
        self.device = torch.device(device)
        self.feature.to(self.device)
        if self.real is not None:
            self.real, self.real_radii = self.real.to(self.device), self.real_radii.to(self.device)
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.feature(c.to(self.device)).double() for c in batches(x)])

    def set_reference(self, real: torch.Tensor) -> None:
        self.real = self.features(real)
        self.real_radii = _kth_nn_radii(self.real, self.k)

    def __call__(self, fake: torch.Tensor) -> dict[str, float]:
        """``{"precision", "recall"}`` of ``fake`` against the reference (more than k samples each)."""
        if self.real is None:
            raise RuntimeError("PrecisionRecall.set_reference was not called")
        fake_features = self.features(fake)
        precision = _inside(fake_features, self.real, self.real_radii).double().mean()
        recall = _inside(self.real, fake_features, _kth_nn_radii(fake_features, self.k)).double().mean()
        return {"precision": float(precision), "recall": float(recall)}


@torch.no_grad()
def inception_score(logits_net: nn.Module, x: torch.Tensor, splits: int = 10, seed: int = 0) -> float:
    """Inception score (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))), mean over ``splits`` random splits, by
    torchmetrics' ``InceptionScore`` with the classifier ``logits_net`` (the split shuffle is seeded by ``seed``).
    """
    device = next(logits_net.parameters()).device
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")  # a few thousand rows here
        metric = InceptionScore(feature=logits_net, splits=splits).to(device)
    for chunk in batches(x):
        metric.update(chunk.to(device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


_TOY2D_SOURCE = re.compile(r"^builtin:toy2d:(?P<name>[^:]+)(:\d+)?$")


def mixture_of(info: dict[str, Any]) -> Mixture2D | None:
    """The built-in mixture the shards were drawn from (dataset.json ``source`` = ``builtin:toy2d:<name>[:<N>]``)."""
    match = _TOY2D_SOURCE.match(str(info.get("source") or ""))
    return TOY2D.get(match["name"]) if match else None


# ------------------------------------------------------------------------------------------ classifier two-sample test
def _c2st_network(shape: list[int]) -> nn.Module:
    """The C2ST classifier: a small position-aware CNN on pixels ([C, H, W]: 3x3 convs, stride-2 down to ≤ 4x4,
    flattened into a linear logit) or a 2-hidden-layer MLP on points ([D])."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 1))
    channels, res = shape[0], shape[1]
    layers: list[nn.Module] = [nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU()]
    width = 32
    while res > 4:
        layers += [nn.Conv2d(width, 64, 3, stride=2, padding=1), nn.SiLU()]
        width, res = 64, (res + 1) // 2
    layers += [nn.Conv2d(width, 64, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * res * res, 1)]
    return nn.Sequential(*layers)


class ClassifierTwoSampleTest:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample Tests"): the held-out
    accuracy of a small classifier trained to tell real from generated samples. 0.5 = indistinguishable (the
    classifier does no better than chance), 1.0 = always told apart.

    Equal numbers of real and generated samples (the smaller set's size, at most ``max_n`` each) are split into
    ``folds`` folds; for each fold a fresh classifier (``_c2st_network``: pixels for images, raw values for points,
    standardised by the real set's mean and std) is trained on the others with Adam and scored on it, so every
    sample is tested exactly once (cross-validated accuracy, less noisy than one split on small sets such as the
    270 held-out digits). Everything is seeded: the same sets give the same number.

    Args:
        folds: number of cross-validation folds (≥ 2).
        epochs: passes over each fold's training samples.
        batch_size: classifier batch size.
        lr: Adam learning rate.
        max_n: at most this many samples per side.
        seed: seed of the fold split, the initialisation and the batches.
        device: where the classifier trains.
    """

    def __init__(
        self,
        folds: int = 5,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        max_n: int = 2000,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if folds < 2:
            raise ValueError(f"C2ST needs at least 2 folds, got {folds}")
        self.folds, self.epochs, self.batch_size, self.lr = folds, epochs, batch_size, lr
        self.max_n, self.seed = max_n, seed
        self.device = torch.device(device)
        self.real: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> ClassifierTwoSampleTest:
        self.device = torch.device(device)
        return self

    def set_reference(self, real: torch.Tensor) -> None:
        """The real samples (uint8 pixels or float points)."""
        self.real = real[: self.max_n].float()

    def __call__(self, fake: torch.Tensor) -> float:
        """Cross-validated held-out accuracy of real-vs-``fake`` classifiers, in [0, 1]."""
        if self.real is None:
            raise RuntimeError("ClassifierTwoSampleTest.set_reference was not called")
        n = min(len(self.real), len(fake), self.max_n)
        if n < self.folds:
            raise ValueError(f"C2ST needs at least {self.folds} samples per side, got {n}")
        gen = torch.Generator().manual_seed(self.seed)
        real = self.real[torch.randperm(len(self.real), generator=gen)[:n]]
        fake = fake.float()[torch.randperm(len(fake), generator=gen)[:n]]
        mean, std = real.mean(), real.std().clamp_min(1e-6)
        x = ((torch.cat([real, fake]) - mean) / std).to(self.device)
        y = torch.cat([torch.ones(n), torch.zeros(n)]).to(self.device)
        fold = torch.randperm(2 * n, generator=gen) % self.folds
        correct = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for k in range(self.folds):
                train, test = (fold != k).to(self.device), (fold == k).to(self.device)
                net = self._train(x[train], y[train], gen)
                with torch.no_grad():
                    correct += int(((net(x[test]).squeeze(1) > 0).float() == y[test]).sum())
        return correct / (2 * n)

    def _train(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> nn.Module:
        net = _c2st_network(list(x.shape[1:])).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(x), generator=gen).to(self.device)
                for start in range(0, len(x), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return net.eval()
