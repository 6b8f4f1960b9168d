"""The digits feature network: a small CNN classifier of scikit-learn's 8x8 digits whose penultimate layer feeds the
Fréchet distance (the role Inception-v3's pool3 layer plays for FID, Heusel et al. 2017, on a data set Inception was
never meant to see: 8x8 grayscale digits).

It is trained by lit_gen itself on a fixed, seeded, stratified 80/20 split of the 1797 digits (``digits_split``), so
nothing is downloaded, and cached as safetensors under ``$LIT_GEN_CACHE`` (default ``~/.cache/lit_gen``); a missing,
unreadable or outdated cache file is retrained (a few seconds on a CPU). Loading never unpickles anything.

Input convention = what ``LoadedModel.sample`` returns for the digits shards (``lit-gen shards builtin:digits``):
``(N, 1, 8, 8)`` pixel values in 0..255 (uint8 or float); the network maps them to [-1, 1] itself.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from lit_gen.data.builtin import load_digits

VERSION = "1"  # bump when the architecture, the split or the training recipe changes: old cache files are retrained
CACHE_NAME = f"digits_classifier_v{VERSION}.safetensors"
SPLIT_SEED = 0
TEST_FRACTION = 0.2
MIN_TEST_ACCURACY = 0.97


def cache_dir() -> Path:
    """``$LIT_GEN_CACHE`` or ``~/.cache/lit_gen``."""
    return Path(os.environ.get("LIT_GEN_CACHE") or Path.home() / ".cache" / "lit_gen").expanduser()


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed train/test split of scikit-learn's digits: stratified, 20 % test, ``random_state=0``.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``; images uint8 ``(N, 1, 8, 8)`` in 0..255 exactly as
        ``lit-gen shards builtin:digits`` stores them (1437 train, 360 test).
    """
    from sklearn.model_selection import train_test_split

    images, labels = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return train_x, train_y, test_x, test_y


class DigitsClassifier(nn.Module):
    """conv(32) → conv(64) → max-pool → conv(64) → flatten → linear(64) + ReLU [features] → linear(10).

    Args:
        feature_dim: Width of the penultimate (feature) layer.
    """

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.num_features = feature_dim  # read by torchmetrics' FrechetInceptionDistance
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(N, feature_dim)`` of pixels ``(N, 1, 8, 8)`` in 0..255."""
        x = pixels.to(self.fc.weight.dtype).reshape(-1, 1, 8, 8) / 127.5 - 1.0
        return F.relu(self.fc(self.conv(x)))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.features(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The FD features (torchmetrics calls ``forward``)."""
        return self.features(pixels)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (zero padding): cheap augmentation so features do not hinge on exact
    placement, which generated digits do not reproduce."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8)[None])[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None])[:, None, :].expand(n, 8, 8)
    index = torch.arange(n)[:, None, None].expand(n, 8, 8)
    return padded[index, 0, rows, cols][:, None]


def accuracy(model: DigitsClassifier, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of ``images`` (uint8 pixels ``(N, 1, 8, 8)``) classified as ``labels``."""
    with torch.no_grad():
        predicted = model.logits(torch.as_tensor(np.asarray(images))).argmax(1)
    return float((predicted == torch.as_tensor(np.asarray(labels))).float().mean())


def train_digits_classifier(
    epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
) -> tuple[DigitsClassifier, float]:
    """Train the classifier on ``digits_split``'s train part; deterministic for a given seed on a given machine.

    A plain loop rather than a Lightning Trainer: ~2 s of work on 1437 images, no checkpoints or logs wanted, and the
    Trainer's start-up would cost more than the training.

    Args:
        epochs: Passes over the 1437 training images.
        batch_size: Images per AdamW step.
        lr: Peak learning rate (cosine decay to 0).
        seed: Seed of the initialisation, the batch order and the augmentation.

    Returns:
        ``(model in eval mode, accuracy on the 360 test images)``.
    """
    train_x, train_y, test_x, test_y = digits_split()
    x = torch.from_numpy(train_x).float()
    y = torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + np.cos(np.pi * min(k / steps, 1))))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model.logits(_shift(x[batch], generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    return model, accuracy(model, test_x, test_y)


def load_digits_classifier(path: str | Path | None = None, retrain: bool = False) -> DigitsClassifier:
    """The cached classifier (eval mode, no grad); trained and cached first when the file is missing or outdated.

    Args:
        path: Cache file (default ``cache_dir() / CACHE_NAME``).
        retrain: Ignore an existing cache file.
    """
    path = Path(path) if path is not None else cache_dir() / CACHE_NAME
    if path.is_file() and not retrain:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("version") == VERSION:
                model = DigitsClassifier()
                model.load_state_dict(load_file(str(path)))
                return model.eval().requires_grad_(False)
        except (SafetensorError, OSError, RuntimeError, ValueError):
            pass  # truncated or foreign file: retrain and overwrite it
    model, test_accuracy = train_digits_classifier()
    if test_accuracy < MIN_TEST_ACCURACY:  # guards the recipe against library drift; never expected to trigger
        warnings.warn(f"digits classifier reached only {test_accuracy:.3f} test accuracy", stacklevel=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent processes: each writes its own, then swap
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"version": VERSION, "test_accuracy": f"{test_accuracy:.4f}"})
        tmp.replace(path)
    except OSError as err:
        warnings.warn(
            f"cannot cache the digits classifier at {path} ({err}); it will be retrained next time", stacklevel=2
        )
    return model
