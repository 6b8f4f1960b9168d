"""``dataset.json``: what a shard folder holds, and the one normalisation convention everything else relies on.

The training tensor is ``x = (raw - shift) / scale``:

- images: ``raw`` are uint8 pixels, ``shift = scale = 127.5``, so ``x`` lies in [-1, 1];
- points: ``shift`` is the per-dimension mean (a list) and ``scale`` twice the standard deviation of the centred
  points (all dimensions pooled), so the training points have standard deviation 0.5 (EDM's sigma_data).

``normalize``/``denormalize`` accept numpy arrays or torch tensors (channel-first images ``[..., C, H, W]``, points
``[..., D]``) and return the same kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lit_gen.errors import LitGenError

INFO_NAME = "dataset.json"
FORMAT = 1
REQUIRED_KEYS = ("format", "kind", "shape", "num_samples", "num_classes", "normalize", "shards")


def info_path(path_or_dir: str | Path) -> Path:
    """The ``dataset.json`` a path means: the file itself, or ``dataset.json`` inside a folder."""
    path = Path(path_or_dir)
    return path / INFO_NAME if path.is_dir() else path


def parse_info(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse and check the content of a ``dataset.json``.

    Args:
        text: The file's content.
        where: Where it came from, for error messages.
    """
    try:
        info = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise LitGenError(f"{where} is not valid JSON ({err}); rewrite it with `lit-gen shards`") from None
    if not isinstance(info, dict):
        raise LitGenError(f"{where} does not hold a JSON object; rewrite it with `lit-gen shards`")
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise LitGenError(f"{where} lacks the key(s) {', '.join(missing)}; rewrite it with `lit-gen shards`")
    if info["format"] != FORMAT:
        raise LitGenError(f"{where} has format {info['format']!r}, this lit_gen reads format {FORMAT}")
    if info["kind"] not in ("image", "points"):
        raise LitGenError(f"{where} has kind {info['kind']!r}; expected 'image' or 'points'")
    norm = info["normalize"]
    if not isinstance(norm, dict) or "shift" not in norm or "scale" not in norm:
        raise LitGenError(f"{where} has no normalize.shift/normalize.scale; rewrite it with `lit-gen shards`")
    return info


def read_info(path_or_dir: str | Path) -> dict[str, Any]:
    """Read the ``dataset.json`` of a shard folder.

    Args:
        path_or_dir: The ``dataset.json`` file, or the folder holding it.

    Raises:
        LitGenError: When the file is missing, unreadable or not a lit_gen dataset description.
    """
    path = info_path(path_or_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise LitGenError(f"no {INFO_NAME} at {path}; shard folders written by `lit-gen shards` have one") from None
    except OSError as err:
        raise LitGenError(f"cannot read {path}: {err.strerror or err}") from None
    return parse_info(text, str(path))


def _shift_scale(info: dict[str, Any], like: Any) -> tuple[Any, float]:
    """Return ``shift`` as something that broadcasts against ``like`` (points: along the last dim), and ``scale``."""
    norm = info["normalize"]
    shift, scale = norm["shift"], float(norm["scale"])
    if isinstance(shift, list):
        shift = np.asarray(shift, dtype=np.float32)
        if _is_torch(like):
            import torch

            shift = torch.as_tensor(shift, device=like.device)
    else:
        shift = float(shift)
    return shift, scale


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_float(x: Any) -> Any:
    if _is_torch(x):
        import torch

        return x if x.dtype in (torch.float32, torch.float64) else x.float()
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def normalize(raw: Any, info: dict[str, Any]) -> Any:
    """Raw data (uint8 pixels or points in data units) -> training tensor ``(raw - shift) / scale``, float.

    Args:
        raw: numpy array or torch tensor (integers are converted to float32).
        info: The dataset description (``read_info``).
    """
    raw = _as_float(raw)
    shift, scale = _shift_scale(info, raw)
    return (raw - shift) / scale


def denormalize(x: Any, info: dict[str, Any]) -> Any:
    """Training tensor -> raw units, ``x * scale + shift`` (float; pixels are not rounded, see ``to_uint8``).

    Args:
        x: numpy array or torch tensor.
        info: The dataset description (``read_info``).
    """
    x = _as_float(x)
    shift, scale = _shift_scale(info, x)
    return x * scale + shift


def to_uint8(x: Any, info: dict[str, Any]) -> Any:
    """Training-space images -> uint8 pixels: denormalise, round, clip to 0..255.

    Args:
        x: numpy array or torch tensor of images in training space.
        info: The dataset description; must be of kind "image".
    """
    if info["kind"] != "image":
        raise ValueError("to_uint8 is for image datasets")
    raw = denormalize(x, info)
    if _is_torch(raw):
        import torch

        return raw.round().clamp(0, 255).to(torch.uint8)
    return np.clip(np.rint(raw), 0, 255).astype(np.uint8)
