"""Latent data: a diffusers ``AutoencoderKL`` between pixels and the space a latent teacher (DiT, SD-class U-Nets)
denoises in.

Convention (diffusers' latent pipelines, e.g. ``DiTPipeline`` and ``StableDiffusionPipeline``; Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 4.3 and App. G): a latent is
``z = (E(x) − shift_factor) · scaling_factor`` for pixels x in [-1, 1], where ``scaling_factor`` (0.18215 for the
Stable Diffusion VAE that DiT uses) gives the latents roughly unit variance, and decoding is
``x = D(z / scaling_factor + shift_factor)``. Latent shards store that z (float32 ``.npy``), so their
``dataset.json`` has ``kind: "latent"``, ``normalize = {shift: 0, scale: 1}`` and a ``vae`` record:

    {"class": "AutoencoderKL", "path": <folder or lit_gen teacher file holding the VAE>, "config": {...},
     "scaling_factor": s, "shift_factor": m, "fingerprint": <sha256 of the VAE's tensors>, "image_shape": [C, H, W],
     "encode": "sample" | "mean"}

``scaling_factor`` / ``shift_factor`` may also be per-channel lists, and an optional ``pixel_range`` [lo, hi] (default
[-1, 1]) says what pixel range the VAE reads and writes: EDM2's ImageNet-512 latents (Karras et al. 2024,
``training/encoders.py``) are ``E(x / 255)·scale_c + bias_c`` — per-channel, on pixels in [0, 1]
(``importers.edm_pickle.edm2_latent_map``).

Where the VAE lives (a choice, see README "Bring your own teacher"): an imported latent *teacher* carries the VAE's
tensors inside its ``.safetensors`` (under ``vae.``; its record has ``path: null``, filled with the file's own path
when it is loaded), so the one teacher file samples to PNG wherever it is copied — the house rule that a model file
needs nothing but its path. Shards and *students* record a *reference* (absolute path + fingerprint) to the VAE they
were encoded with (a VAE folder, or the teacher file): the VAE is frozen and the same for every student checkpoint,
so it is not copied into each one; the fingerprint makes a moved or different VAE a one-line error instead of
silently wrong pictures.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_gen.errors import LitGenError

VAE_CLASS = "AutoencoderKL"
VAE_PREFIX = "vae."  # the carried VAE's tensors inside a latent teacher's .safetensors
DEFAULT_SCALING = 0.18215  # diffusers' AutoencoderKL default (the Stable Diffusion VAE)
ENCODE_MODES: dict[str, str] = {
    "sample": "z ~ the encoder's posterior N(μ, σ²), as DiT's train.py (latent_dist.sample()); seeded per sample",
    "mean": "z = μ, the posterior mean (latent_dist.mode())",
}
_CONFIG_ONLY_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
LATENT_MAP = "_lit_gen_latent_map"  # in a config read back from a teacher file: that teacher's own latent map
DEFAULT_PIXEL_RANGE = [-1.0, 1.0]


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes and bytes, sorted by name): the VAE's identity."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    name = config.get("_class_name")
    if name != VAE_CLASS:
        raise LitGenError(f"{where} is no {VAE_CLASS} (its config.json describes a {name!r}); --encode needs a VAE")
    return {k: v for k, v in config.items() if k not in _CONFIG_ONLY_KEYS}


def read_vae_source(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], Path]:
    """(config, tensors, resolved path) of a VAE given as an ``AutoencoderKL`` model folder, a diffusers pipeline
    folder with ``vae/``, or a lit_gen latent teacher ``.safetensors`` that carries its VAE."""
    from lit_gen.importers.diffusers import read_json, read_model_weights

    path = Path(path).expanduser()
    if not path.exists():
        raise LitGenError(f"the VAE {path} does not exist")
    if path.is_dir():
        if (path / "model_index.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise LitGenError(f"{path} is no {VAE_CLASS} folder (no config.json); --encode needs a diffusers VAE")
        config = vae_config(read_json(path / "config.json", "VAE config"), str(path))
        return config, read_model_weights(path), path.resolve()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:  # only the VAE's tensors are read, not the (possibly 3 GB) denoiser's
            with safe_open(str(path), framework="pt") as handle:
                description = json.loads((handle.metadata() or {}).get("lit_gen", "{}"))
                keys = [k for k in handle.keys() if k.startswith(VAE_PREFIX)]
                vae = {k[len(VAE_PREFIX) :]: handle.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as err:
            raise LitGenError(f"cannot read {path} (truncated or not a safetensors file?): {err}") from None
        record = (description.get("data") or {}).get("vae")
        if record is None or not vae:
            raise LitGenError(f"{path} carries no VAE (only an imported latent teacher does); pass the VAE folder")
        config = dict(record["config"])
        if "pixel_range" in record or isinstance(record.get("scaling_factor"), list):
            keys = ("scaling_factor", "shift_factor", "pixel_range")  # a map the VAE's config does not hold (EDM2)
            config[LATENT_MAP] = {k: record[k] for k in keys if k in record}
        return config, vae, path.resolve()
    raise LitGenError(f"{path} is neither an {VAE_CLASS} folder nor a lit_gen latent teacher (.safetensors)")


def build_vae(config: dict[str, Any], tensors: dict[str, Tensor], where: str) -> torch.nn.Module:
    """diffusers' own ``AutoencoderKL`` from ``config`` with ``tensors`` loaded (one-line errors), eval, frozen."""
    from diffusers import AutoencoderKL

    from lit_gen.importers import load_weights

    config = {k: v for k, v in config.items() if k != LATENT_MAP}
    try:
        vae = AutoencoderKL.from_config(config)
    except Exception as err:  # noqa: BLE001 - diffusers rejects bad configs with many exception types
        raise LitGenError(f"{where}: diffusers cannot build {VAE_CLASS} from its config: {err}") from None
    load_weights(vae, tensors, where)
    return vae.eval().requires_grad_(False)


def downsample_factor(config: dict[str, Any]) -> int:
    """Pixels per latent along a side: 2^(number of encoder blocks − 1) (diffusers' ``vae_scale_factor``)."""
    return 2 ** (len(config.get("block_out_channels", [64])) - 1)


def _factor(value: Any) -> float | list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def vae_record(
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    path: Path | None,
    image_shape: list[int],
    encode: str,
    latent_map: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``vae`` entry of a latent data description (``path`` None: carried in the file that holds it).
    ``latent_map`` ({scaling_factor, shift_factor, pixel_range}) replaces the VAE config's scaling (a teacher
    trained on another normalisation, EDM2's); a config read from such a teacher file carries it (``LATENT_MAP``)."""
    config = dict(config)
    latent_map = latent_map or config.pop(LATENT_MAP, None) or {}
    config.pop(LATENT_MAP, None)
    record = {
        "class": VAE_CLASS,
        "path": None if path is None else str(path),
        "config": config,
        "scaling_factor": _factor(latent_map.get("scaling_factor", config.get("scaling_factor") or DEFAULT_SCALING)),
        "shift_factor": _factor(latent_map.get("shift_factor", config.get("shift_factor") or 0.0)),
        "fingerprint": fingerprint(tensors),
        "image_shape": [int(s) for s in image_shape],
        "encode": encode,
    }
    if "pixel_range" in latent_map:
        record["pixel_range"] = [float(v) for v in latent_map["pixel_range"]]
    return record


def _per_channel(value: Any, like: Tensor) -> Tensor:
    """A scaling/shift factor (a number or a per-channel list) broadcastable against [B, C, H, W] latents."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.reshape(1, -1, 1, 1) if t.ndim else t


def pixel_range(record: dict[str, Any]) -> tuple[float, float]:
    lo, hi = record.get("pixel_range") or DEFAULT_PIXEL_RANGE
    return float(lo), float(hi)


def latent_info(
    record: dict[str, Any], shape: list[int], num_classes: int, num_samples: int = 0, shards: list[str] | None = None
) -> dict[str, Any]:
    """A ``dataset.json``-style description of latent data (``kind`` "latent", identity normalisation)."""
    return {
        "format": 1,
        "kind": "latent",
        "shape": [int(s) for s in shape],
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
        "normalize": {"shift": 0.0, "scale": 1.0},
        "shards": list(shards or []),
        "vae": record,
    }


def same_vae(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two ``vae`` records describe the same latent space (same weights and the same affine map)."""
    keys = ("fingerprint", "scaling_factor", "shift_factor")
    return all(a.get(k) == b.get(k) for k in keys) and pixel_range(a) == pixel_range(b)


def split_carried_vae(
    tensors: dict[str, Tensor], description: dict[str, Any], path: str | Path
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(network tensors, description) of a model file: a carried VAE's tensors are set aside, and its record's
    ``path`` (null: "in this file") becomes this file's path, so decoding finds them wherever the file was copied."""
    if not any(k.startswith(VAE_PREFIX) for k in tensors):
        return tensors, description
    net = {k: v for k, v in tensors.items() if not k.startswith(VAE_PREFIX)}
    record = (description.get("data") or {}).get("vae")
    if record is not None and record.get("path") is None:
        description = copy.deepcopy(description)
        description["data"]["vae"]["path"] = str(Path(path).resolve())
    return net, description


@functools.lru_cache(maxsize=4)
def _load_vae_cached(path: str, expected: str, config_json: str) -> torch.nn.Module:
    _, tensors, _ = read_vae_source(path)
    found = fingerprint(tensors)
    if found != expected:
        raise LitGenError(
            f"the VAE at {path} is not the one these latents were made with (fingerprint {found[:12]}, expected "
            f"{expected[:12]})"
        )
    return build_vae(json.loads(config_json), tensors, path)


def load_vae(record: dict[str, Any]) -> torch.nn.Module:
    """The VAE a ``vae`` record refers to, checked against its fingerprint (cached: decoding a sample grid every
    few hundred steps reads it once)."""
    path = record.get("path")
    if not path:
        raise LitGenError("this latent model's VAE record has no path (a carried VAE is read from its own file)")
    if not Path(path).exists():
        raise LitGenError(
            f"the VAE these latents were made with, {path}, does not exist (moved?); put it back at that path"
        )
    return _load_vae_cached(str(path), str(record["fingerprint"]), json.dumps(record["config"], sort_keys=True))


@torch.no_grad()
def encode_images(
    vae: torch.nn.Module,
    record: dict[str, Any],
    pixels: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """uint8-range pixels [B, C, H, W] -> latents z = (E(x) − shift)·scale, float32. ``noise`` (the shape of the
    latents) draws z from the posterior (mode "sample"); None takes its mean. Grayscale pixels are repeated to the
    VAE's channels (a 3-channel VAE reads an RGB image whose channels are equal)."""
    lo, hi = pixel_range(record)
    x = (
        pixels.to(torch.float32) / 127.5 - 1.0
        if (lo, hi) == (-1.0, 1.0)
        else pixels.to(torch.float32) / 255.0 * (hi - lo) + lo
    )
    channels = int(vae.config.in_channels)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != channels:
        raise LitGenError(f"the VAE takes {channels}-channel images, these have {x.shape[1]} channels")
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(x.to(device=next(vae.parameters()).device, dtype=dtype)).latent_dist
    z = (dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean)).float()
    return ((z - _per_channel(record["shift_factor"], z)) * _per_channel(record["scaling_factor"], z)).cpu()


@torch.no_grad()
def decode_latents(
    latents: Tensor, info: dict[str, Any], device: str | torch.device = "cpu", batch_size: int = 64
) -> Tensor:
    """Latents (data units of a latent data description) -> uint8-range float pixels [B, C, H, W], decoded by the
    VAE ``info["vae"]`` refers to: x = D(z/scale + shift), clamped to the pixel range [lo, hi] (default [-1, 1]),
    then (x − lo)/(hi − lo)·255."""
    record = info["vae"]
    lo, hi = pixel_range(record)
    vae = load_vae(record).to(device)
    dtype = next(vae.parameters()).dtype
    out = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size].to(device=device, dtype=torch.float32)
        z = z / _per_channel(record["scaling_factor"], z) + _per_channel(record["shift_factor"], z)
        x = vae.decode(z.to(dtype)).sample.float()
        x = (x.clamp(-1, 1) + 1) * 127.5 if (lo, hi) == (-1.0, 1.0) else (x.clamp(lo, hi) - lo) / (hi - lo) * 255.0
        out.append(x.cpu())
    return torch.cat(out)
