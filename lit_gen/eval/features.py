"""Feature networks for the Fréchet distance (a named table, ``FEATURES``), each an ``nn.Module`` that torchmetrics'
``FrechetInceptionDistance`` accepts as ``feature`` (it reads ``num_features``):

- ``raw``: the values themselves, flattened (points in data units; images as 0..255 pixels). For low-dimensional data
  the Fréchet distance is then the exact 2-Wasserstein distance between the Gaussian fits of the two sets.
- ``digits``: the penultimate layer of lit_gen's digits classifier (``digits_classifier.py``), for 1x8x8 images.
- ``inception``: Inception-v3 pool3 (2048-d), the FID of Heusel et al. 2017, through torchmetrics'
  ``NoTrainInceptionV3`` (torch-fidelity's port of the 2015-12-05 TensorFlow graph). Its weights are read from a
  local file only, never downloaded (see ``inception_weights_path``), and unpickled with ``weights_only=True``.

Every network takes data in the units ``LoadedModel.sample`` returns (points: data units; images: ``(N, C, H, W)``
pixel values in 0..255).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_gen.errors import LitGenError, first_line, load_torch_file
from lit_gen.eval.digits_classifier import cache_dir, load_digits_classifier

INCEPTION_ENV = "LIT_GEN_INCEPTION_WEIGHTS"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name; torch-fidelity calls it:
INCEPTION_FILE_ALT = "weights-inception-2015-12-05-6726825d.pth"


class RawFeatures(nn.Module):
    """The data flattened to ``(N, prod(shape))`` float64 vectors (float64: points need no more than that, and the
    Fréchet distance of nearly identical sets is a small difference of large numbers).

    Args:
        shape: Shape of one sample (dataset.json's ``shape``).
    """

    def __init__(self, shape: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.num_features = math.prod(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(torch.float64)


class InceptionFeatures(nn.Module):
    """Inception-v3 of the FID (torch-fidelity's port, run through torchmetrics' ``NoTrainInceptionV3``).

    Images of any size are resized inside to 299x299 (bilinear, antialiased); 1-channel images are repeated to RGB;
    float pixel values are rounded to uint8 first, as a PNG of the samples would store them.

    Args:
        weights: Path of the weights file (``inception_weights_path``).
        output: "2048" (pool3 features, for FID) or "logits_unbiased" (1008 logits, for the Inception score).
    """

    def __init__(self, weights: str | Path, output: str = "2048") -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        data = _read_weights(Path(weights))
        if not _TORCH_FIDELITY_AVAILABLE:
            raise LitGenError("Inception metrics need the torch-fidelity package: pip install torch-fidelity==0.4.0")
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            # torch-fidelity unpickles the file it is given with weights_only=False; it gets the very bytes that
            # passed the weights_only=True check in _read_weights, as an in-memory file.
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[output], feature_extractor_weights_path=io.BytesIO(data)
            )
        except (RuntimeError, KeyError) as err:
            raise LitGenError(f"{weights} is not the FID Inception-v3 weights file ({first_line(err)})") from None
        self.num_features = 2048 if output == "2048" else 1008

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = images.round().clamp(0, 255).to(torch.uint8)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images)


def _read_weights(path: Path) -> bytes:
    """The file's bytes, after checking that they unpickle with ``weights_only=True`` into a state dict."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LitGenError(f"cannot read the Inception weights {path}: {first_line(err)}") from None
    state = load_torch_file(io.BytesIO(data), f"the Inception weights {path}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LitGenError(f"{path} is not a state dict of tensors (expected the FID Inception-v3 weights)")
    return data


def inception_weights_path(path: str | Path | None = None) -> Path:
    """Where the FID Inception weights are: ``path``, else ``$LIT_GEN_INCEPTION_WEIGHTS``, else the file under the
    cache folder (``$LIT_GEN_CACHE`` or ``~/.cache/lit_gen``) by either of its two usual names.

    Raises:
        LitGenError: When none exists (nothing is ever downloaded); the message says which file to put where.
    """
    if path is None:
        path = os.environ.get(INCEPTION_ENV) or None
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise LitGenError(
                f"Inception weights {path} do not exist; download {INCEPTION_FILE} (the FID Inception-v3 weights of "
                "pytorch-fid / torch-fidelity) yourself and give its path"
            )
        return path
    for name in (INCEPTION_FILE, INCEPTION_FILE_ALT):
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    raise LitGenError(
        f"FID needs the Inception-v3 weights {INCEPTION_FILE} (pytorch-fid / torch-fidelity release file; lit_gen "
        f"never downloads): put it at {cache_dir() / INCEPTION_FILE}, or pass --inception-weights PATH, or set "
        f"{INCEPTION_ENV}"
    )


class _Logits(nn.Module):
    """The digits classifier's logits as a module (torchmetrics' ``InceptionScore`` calls ``forward``)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(x)


# name -> (what it is, the data it fits)
FEATURES: dict[str, str] = {
    "raw": "the values themselves (points in data units, images as 0..255 pixels)",
    "digits": "penultimate layer (64-d) of lit_gen's digits classifier; 1x8x8 images",
    "inception": "Inception-v3 pool3 (2048-d) of the FID; local weights file",
}


def is_digits(info: dict[str, Any]) -> bool:
    """Data the digits classifier fits: 1x8x8 images (``lit-gen shards builtin:digits``)."""
    return info["kind"] == "image" and [int(s) for s in info["shape"]] == [1, 8, 8]


def default_features(info: dict[str, Any]) -> str:
    """The feature space ``fd`` means for this data: raw for points and latents (the Fréchet distance in latent
    space; score decoded images against pixel shards for Inception), digits for 1x8x8 images, else Inception."""
    if info["kind"] in ("points", "latent"):
        return "raw"
    return "digits" if is_digits(info) else "inception"


def feature_network(
    name: str, info: dict[str, Any], inception_weights: str | Path | None = None, logits: bool = False
) -> nn.Module:
    """Build the feature network ``name`` (a ``FEATURES`` key) for data described by ``info``, in eval mode.

    Args:
        name: "raw", "digits" or "inception".
        info: The reference data's ``dataset.json``.
        inception_weights: Path of the Inception weights (default: see ``inception_weights_path``).
        logits: Return class logits instead of features (for the Inception score; not for "raw").
    """
    if name not in FEATURES:
        raise LitGenError(f"unknown feature network {name!r}; choose one of {', '.join(FEATURES)}")
    if name == "raw":
        if logits:
            raise LitGenError("raw values have no class logits: the Inception score needs images")
        return RawFeatures(info["shape"]).eval()
    if info["kind"] != "image":
        hint = (
            " (score against pixel shards of the same images: samples are decoded)" if info["kind"] == "latent" else ""
        )
        raise LitGenError(
            f"the {name} feature network is for images, but the reference shards hold {info['kind']}{hint}"
        )
    if name == "digits":
        if not is_digits(info):
            raise LitGenError(
                f"the digits feature network takes 1x8x8 images (builtin:digits); these are {info['shape']}"
            )
        classifier = load_digits_classifier()
        return (_Logits(classifier) if logits else classifier).eval()
    return InceptionFeatures(inception_weights_path(inception_weights), "logits_unbiased" if logits else "2048").eval()
