"""``dataset.json``: what a shard folder holds, and the one normalisation convention everything else relies on.

The training tensor is ``x = (raw - shift) / scale``:

- images: ``raw`` are uint8 pixels, ``shift = scale = 127.5``, so ``x`` lies in [-1, 1];
- points: ``shift`` is the per-dimension mean (a list) and ``scale`` twice the standard deviation of the centred
  points (all dimensions pooled), so the training points have standard deviation 0.5 (EDM's sigma_data);
- latents (``lit-gen shards SRC --encode VAE``): ``raw`` are a VAE's latents already times its ``scaling_factor``
  (``lit_gen.latents``), ``shift = 0``, ``scale = 1``; the ``vae`` entry says which VAE and how to decode them.

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
KINDS = ("image", "points", "latent")
VAE_KEYS = ("path", "config", "scaling_factor", "shift_factor", "fingerprint", "image_shape")


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
    if info["kind"] not in KINDS:
        raise LitGenError(f"{where} has kind {info['kind']!r}; expected one of {', '.join(KINDS)}")
    if info["kind"] == "latent":
        vae = info.get("vae")
        missing_vae = [k for k in VAE_KEYS if not isinstance(vae, dict) or k not in vae]
        if missing_vae:
            raise LitGenError(
                f"{where} holds latents but its vae record lacks {', '.join(missing_vae)}; rewrite it with "
                "`lit-gen shards SRC --encode VAE`"
            )
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


def to_output(x: Any, info: dict[str, Any], device: Any = "cpu") -> Any:
    """Model-space samples -> what a user looks at: ``denormalize``d data, and for latent data the pixels its VAE
    decodes them to (uint8-range floats ``[N, C, H, W]``, ``lit_gen.latents.decode_latents`` on ``device``)."""
    if info["kind"] == "latent":
        from lit_gen.latents import decode_latents

        return decode_latents(denormalize(x, info), info, device=device)
    return denormalize(x, info)


def describe_data(info: dict[str, Any]) -> str:
    """``image [3, 32, 32]``, ``latent [4, 32, 32] of VAE 1a2b3c4d5e6f`` (its fingerprint): for error messages."""
    text = f"{info.get('kind')} {list(info.get('shape', []))}"
    vae = info.get("vae") if info.get("kind") == "latent" else None
    return f"{text} of VAE {str(vae.get('fingerprint'))[:12]}" if isinstance(vae, dict) else text


def check_compatible(expected: dict[str, Any], info: dict[str, Any], where: str, what: str = "was trained on") -> None:
    """Raise unless ``info`` (shards) holds the kind of data ``expected`` (a model's data description) was trained
    on, where latents are involved: both latent, of the same VAE (fingerprint) and scaling. Shapes (and image vs
    points) are checked by the caller."""
    kind, theirs = (expected or {}).get("kind"), info.get("kind")
    if kind is None or theirs is None or "latent" not in (kind, theirs):
        return  # a partial description, or pixels vs points: the callers' shape checks say it
    if kind != theirs:
        hint = "; encode the images with `lit-gen shards SRC --encode VAE`" if kind == "latent" else ""
        raise LitGenError(f"{where} {what} {describe_data(expected)} but the shards hold {describe_data(info)}{hint}")
    if kind == "latent":
        from lit_gen.latents import same_vae

        if not same_vae(expected["vae"], info["vae"]):
            raise LitGenError(
                f"{where} {what} {describe_data(expected)} but the shards hold {describe_data(info)}: latents "
                "of another VAE (or another scaling_factor/shift_factor); encode them with the teacher's VAE"
            )
