"""``lit-gen shards``: turn an image folder, a numpy array or a built-in dataset into WebDataset tar shards.

Layout written to ``out``::

    shard-000000.tar, shard-000001.tar, ...   samples: <key>.png (images) or <key>.npy (points, latents),
                                              <key>.cls (class)
    dataset.json                              what the shards hold and how to normalise them (see ``info.py``);
                                              also ``shard_sizes`` (samples per shard) and the creating command

With ``--val-fraction F`` the same layout is written twice, into ``out/train`` and ``out/val``.

Storage is lossless: images as 8-bit PNG (grayscale "L" or "RGB"; lossless and 2-4x smaller than raw pixels for
natural images, decoded by PIL in ~20 us for 32x32), points as float32 ``.npy`` (exact, and a fixed-size header the
DataModule parses once). ``__key__`` is the zero-padded index of the sample in the source (sorted file order for
folders, row for arrays); samples are written in a ``seed``-shuffled order so that every shard mixes all classes (a
folder sorted by class would otherwise give single-class shards). The output is byte-identical for the same source
and arguments, whatever ``workers``: tar headers carry a fixed mtime, owner and mode, PNGs carry no metadata, and
samples are written in a fixed order.

With ``encode=VAE`` (``lit-gen shards SRC --encode VAE``) the images are encoded by a diffusers ``AutoencoderKL``
(a VAE folder, a pipeline folder with ``vae/``, or an imported latent teacher carrying one) and the shards hold its
latents × ``scaling_factor`` as float32 ``.npy`` (``kind: "latent"``, see ``lit_gen.latents``), encoded in batches
in this process; the same source, arguments and batch size give the same bytes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from lit_gen.data.builtin import TOY2D, load_digits
from lit_gen.data.info import FORMAT, INFO_NAME
from lit_gen.errors import LitGenError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
TOY2D_DEFAULT_SIZE = 100_000
SHARD_PATTERN = "shard-%06d.tar"
TAR_MTIME = 0  # fixed tar header fields make reruns byte-identical
TAR_OWNER = "lit_gen"


@dataclass
class _Source:
    """A source seen as ``n`` samples: ``get(i)`` gives uint8 CHW pixels (images) or float32 ``(D,)`` points."""

    kind: str
    shape: list[int]
    n: int
    get: Callable[[int], np.ndarray]
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)


def write_shards(
    source: str,
    out: str | Path,
    *,
    shard_size: int = 10000,
    image_size: int | None = None,
    seed: int = 0,
    command: str | None = None,
    val_fraction: float = 0.0,
    workers: int = 1,
    progress: bool = False,
    encode: str | Path | None = None,
    encode_mode: str = "sample",
    device: str = "cpu",
    encode_batch: int = 64,
) -> dict:
    """Write ``source`` as WebDataset shards plus ``dataset.json`` into ``out``.

    Existing ``shard-*.tar`` files in ``out`` (and in ``out/train``, ``out/val``) are deleted first, so the folder
    holds exactly one dataset.

    Args:
        source: A folder of images (png/jpg/jpeg/bmp/webp/gif; class = immediate sub-folder name, sorted, searched
            recursively; images directly in the folder = unconditional; stored as RGB unless every image is
            grayscale; alpha is dropped), an ``.npy``/``.npz`` array, ``builtin:digits`` or
            ``builtin:toy2d:<name>[:<N>]`` (N points, default 100000). Arrays: ``(N, D)`` = points; ``(N, H, W)`` =
            grayscale images; ``(N, C, H, W)`` when axis 1 has 1 or 3 entries, else ``(N, H, W, C)`` with C in
            {1, 3}. Image values may be integers in 0..255, or floats in [0, 1] (scaled by 255) or in [-1, 1]
            (mapped by ``(v + 1) * 127.5``), then rounded to uint8. An ``.npz`` holds the data as ``x``, ``images``
            or ``points`` and optional integer classes as ``y`` or ``labels``.
        out: Output folder (created if needed).
        shard_size: Samples per shard.
        image_size: Resize images so the shorter side is this long (bicubic, PIL) and centre-crop a square (the
            crop drops ``(long - short) / 2`` pixels from each end of the longer side); None keeps the size, which
            must then be the same for every image.
        seed: Seed of the write order and of the train/validation split, and of the points drawn for
            ``builtin:toy2d``.
        command: The command line that made the shards, recorded in ``dataset.json``.
        val_fraction: Fraction of the samples (rounded, at least 1 when > 0) held out for validation. When > 0 the
            shards go to ``out/train`` and ``out/val``, each with its own ``dataset.json``; both share the
            normalisation, computed on the training split (``ShardDataModule`` accepts ``out`` itself: it then
            trains on ``train/`` and validates on ``val/``).
        workers: Processes encoding samples in parallel (PNG compression dominates the cost). The output is
            byte-identical for any value: samples are encoded out of order but written in order.
        progress: Show a progress bar (tqdm) on stderr, when it is a terminal.
        encode: A VAE (``AutoencoderKL`` folder, pipeline folder with ``vae/``, or a lit_gen latent teacher file):
            write its latents of the images instead of the images (``kind: "latent"``); None writes pixels.
        encode_mode: "sample" (a posterior draw seeded by ``(seed, sample index)``, as DiT trains) or "mean".
        device: Where the VAE encodes.
        encode_batch: Images per VAE call.

    Returns:
        The ``dataset.json`` content (of the training split when ``val_fraction > 0``).
    """
    if shard_size < 1:
        raise LitGenError(f"shard size must be at least 1, got {shard_size}")
    if image_size is not None and image_size < 1:
        raise LitGenError(f"image size must be at least 1, got {image_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise LitGenError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    if workers < 1:
        raise LitGenError(f"workers must be at least 1, got {workers}")
    src = _open_source(str(source), image_size, seed)
    if src.n == 0:
        raise LitGenError(f"source {source} holds no samples")
    latent = None
    if encode is not None:
        latent = _LatentEncoder(src, encode, encode_mode, device, encode_batch, seed)
        src = latent.latent_source()
    order = np.random.default_rng([seed, 1]).permutation(src.n)
    n_val = 0 if val_fraction == 0 else max(1, int(round(src.n * val_fraction)))
    if n_val >= src.n:
        raise LitGenError(f"a validation fraction of {val_fraction} leaves no training samples out of {src.n}")

    out = Path(out)
    splits = [(out, order)] if n_val == 0 else [(out / "train", order[n_val:]), (out / "val", order[:n_val])]
    for folder, _ in splits:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LitGenError(f"cannot create the output folder {folder}: {err.strerror or err}") from None
        for stale in folder.glob("shard-*.tar"):
            stale.unlink()

    normalization = _normalization(src, splits[0][1])
    width = max(6, len(str(src.n - 1)))
    infos = []
    encoder_cm = latent if latent is not None else _Encoder(src, workers)
    with encoder_cm as encoder, _progress(src.n, progress, str(out)) as bar:
        for folder, indices in splits:
            written, sizes = _write_split(encoder, src, folder, indices, shard_size, width, bar)
            info = {
                "format": FORMAT,
                "kind": src.kind,
                "shape": src.shape,
                "num_samples": len(indices),
                "num_classes": len(src.class_names),
                "class_names": src.class_names,
                "normalize": normalization,
                "shards": written,
                "shard_sizes": sizes,
                "source": str(source),
                "command": command,
            }
            if latent is not None:
                info["vae"] = latent.record
            if n_val:
                info["split"] = folder.name
            (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
            infos.append(info)
    return infos[0]


def _write_split(
    encoder: _Encoder, src: _Source, folder: Path, indices: np.ndarray, shard_size: int, width: int, bar: Any
) -> tuple[list[str], list[int]]:
    """Write the samples ``indices`` (in that order) into ``folder``; return the shard names and their sizes."""
    written: list[str] = []
    pattern = os.path.join(str(folder).replace("%", "%%"), SHARD_PATTERN)  # ShardWriter fills it with %-formatting
    with wds.ShardWriter(
        pattern,
        maxcount=shard_size,
        verbose=0,
        post=lambda fname: written.append(Path(fname).name),
        mtime=TAR_MTIME,
        user=TAR_OWNER,
        group=TAR_OWNER,
    ) as sink:
        for index, payload in zip(indices, encoder.encode(indices), strict=True):
            index = int(index)
            sample = {"__key__": f"{index:0{width}d}", "png" if src.kind == "image" else "npy": payload}
            if src.labels is not None:
                sample["cls"] = str(int(src.labels[index])).encode("ascii")
            sink.write(sample)
            bar.update(1)
    n = len(indices)
    sizes = [min(shard_size, n - k * shard_size) for k in range(len(written))]
    return written, sizes


_ENCODE_SOURCE: _Source | None = None  # the source seen by forked encoder processes


def _encode_index(index: int) -> bytes:
    """Encode sample ``index`` of ``_ENCODE_SOURCE``: PNG bytes (images) or float32 .npy bytes (points)."""
    raw = _ENCODE_SOURCE.get(int(index))
    if _ENCODE_SOURCE.kind == "image":
        return encode_png(raw)
    return wds.numpy_dumps(np.ascontiguousarray(raw, dtype=np.float32))


class _Encoder:
    """Encodes samples in order, in this process or in ``workers`` forked processes (``Pool.imap`` keeps the order,
    so the output is the same bytes either way). Forking shares the open source (file lists, memory-mapped arrays)
    without pickling it; where fork is unavailable the encoding runs in this process."""

    def __init__(self, src: _Source, workers: int) -> None:
        self.src, self.workers, self.pool = src, workers, None

    def __enter__(self) -> _Encoder:
        global _ENCODE_SOURCE
        _ENCODE_SOURCE = self.src
        if self.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)
        return self

    def encode(self, indices: np.ndarray) -> Any:
        if self.pool is None:
            return map(_encode_index, indices.tolist())
        return self.pool.imap(_encode_index, indices.tolist(), chunksize=64)

    def __exit__(self, *exc: object) -> None:
        global _ENCODE_SOURCE
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()
        _ENCODE_SOURCE = None


class _LatentEncoder:
    """Encodes image samples to VAE latents in order, ``batch`` images per VAE call, in this process; the same
    interface as ``_Encoder`` (``encode(indices)`` yields ``.npy`` bytes in order)."""

    def __init__(self, src: _Source, vae: str | Path, mode: str, device: str, batch: int, seed: int) -> None:
        from lit_gen.latents import ENCODE_MODES, build_vae, read_vae_source, vae_record

        if src.kind != "image":
            raise LitGenError(f"--encode turns images into VAE latents; this source holds {src.kind}")
        if mode not in ENCODE_MODES:
            raise LitGenError(f"unknown encode mode {mode!r}; choose one of {', '.join(ENCODE_MODES)}")
        if batch < 1:
            raise LitGenError(f"the encode batch must be at least 1, got {batch}")
        import torch

        config, tensors, path = read_vae_source(vae)
        self.vae = build_vae(config, tensors, str(path)).to(device)
        channels = int(config.get("in_channels", 3))
        if src.shape[0] not in (channels, 1):
            raise LitGenError(f"the VAE {path} takes {channels}-channel images, the source has {src.shape[0]}")
        self.src, self.mode, self.batch, self.seed = src, mode, batch, seed
        self.record = vae_record(config, tensors, path, [channels, *src.shape[1:]], mode)
        with torch.no_grad():
            self.shape = list(self._latents(np.array([0]), noise=False).shape[1:])

    def latent_source(self) -> _Source:
        return _Source("latent", self.shape, self.src.n, self.src.get, self.src.labels, self.src.class_names)

    def _latents(self, indices: np.ndarray, noise: bool = True) -> Any:
        import torch

        from lit_gen.data.stream import seed_of
        from lit_gen.latents import encode_images

        pixels = torch.from_numpy(np.stack([self.src.get(int(i)) for i in indices]))
        draws = None
        if noise and self.mode == "sample":
            draws = torch.stack(
                [torch.randn(self.shape, generator=torch.Generator().manual_seed(seed_of(self.seed, 2, int(i))))
                 for i in indices]
            )  # fmt: skip
        return encode_images(self.vae, self.record, pixels, draws)

    def __enter__(self) -> _LatentEncoder:
        return self

    def encode(self, indices: np.ndarray) -> Any:
        for start in range(0, len(indices), self.batch):
            for z in self._latents(indices[start : start + self.batch]).numpy():
                yield wds.numpy_dumps(np.ascontiguousarray(z, dtype=np.float32))

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(total: int, enabled: bool, where: str) -> Any:
    """A tqdm progress bar on stderr when ``enabled`` and stderr is a terminal (a no-op bar otherwise)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=None if enabled else True, file=sys.stderr, unit="sample", desc=f"-> {where}")


def encode_png(chw: np.ndarray) -> bytes:
    """uint8 ``(C, H, W)`` pixels, C in {1, 3} -> PNG bytes (deterministic: no metadata, fixed compression)."""
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    with io.BytesIO() as buffer:
        image.save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue()


def _normalization(src: _Source, indices: np.ndarray) -> dict[str, Any]:
    """Images: uint8 -> [-1, 1]. Points: centre per dimension, scale so the points ``indices`` have std 0.5."""
    if src.kind == "image":
        return {"shift": 127.5, "scale": 127.5}
    if src.kind == "latent":  # already (E(x) − shift_factor)·scaling_factor: roughly unit variance by design
        return {"shift": 0.0, "scale": 1.0}
    points = np.stack([src.get(int(i)) for i in np.sort(indices)]).astype(np.float64)
    mean = points.mean(axis=0)
    std = float(np.sqrt(((points - mean) ** 2).mean()))
    return {"shift": [float(m) for m in mean], "scale": 2.0 * std if std > 0 else 1.0}


def _open_source(source: str, image_size: int | None, seed: int) -> _Source:
    if source.startswith("builtin:"):
        return _builtin(source, image_size, seed)
    path = Path(source).expanduser()
    if not path.exists():
        raise LitGenError(f"source {path} does not exist")
    if path.is_dir():
        return _image_folder(path, image_size)
    if path.suffix.lower() in (".npy", ".npz"):
        data, labels = _load_array(path)
        return _array_source(data, labels, image_size, str(path))
    raise LitGenError(f"source {path} is neither a folder of images nor an .npy/.npz array")


def _builtin(source: str, image_size: int | None, seed: int) -> _Source:
    parts = source.split(":")
    if parts[1:] == ["digits"]:
        images, labels = load_digits()
        return _array_source(images, labels, image_size, source, class_names=[str(k) for k in range(10)])
    if len(parts) in (3, 4) and parts[1] == "toy2d" and parts[2] in TOY2D:
        try:
            n = int(parts[3]) if len(parts) == 4 else TOY2D_DEFAULT_SIZE
        except ValueError:
            n = -1
        if n < 1:
            raise LitGenError(f"built-in {source!r}: the point count after the name must be a positive integer")
        points, _ = TOY2D[parts[2]].sample(n, seed)
        # Toy mixtures are unconditional data: the mode index is not stored as a class.
        return _array_source(points, None, image_size, source)
    raise LitGenError(
        f"unknown built-in dataset {source!r}; available: builtin:digits, builtin:toy2d:<name>[:<N>] with <name> one "
        f"of {', '.join(sorted(TOY2D))}"
    )


def _load_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        with np.load(path, allow_pickle=False) as archive:
            data_key = next((k for k in ("x", "images", "points") if k in archive.files), None)
            if data_key is None:
                raise LitGenError(
                    f"{path} holds {', '.join(archive.files) or 'no arrays'}; name the data 'x', 'images' or 'points'"
                )
            label_key = next((k for k in ("y", "labels") if k in archive.files), None)
            return archive[data_key], (archive[label_key] if label_key else None)
    except (OSError, ValueError, EOFError) as err:
        raise LitGenError(f"cannot read the array {path}: {err}") from None


def _array_source(
    data: np.ndarray,
    labels: np.ndarray | None,
    image_size: int | None,
    where: str,
    class_names: list[str] | None = None,
) -> _Source:
    """Classify an array as points or images (see ``write_shards``) and check its values."""
    if data.dtype.kind not in "uif" or data.ndim not in (2, 3, 4) or data.size == 0:
        raise LitGenError(
            f"{where} holds an array of shape {tuple(data.shape)} and dtype {data.dtype}; expected numeric points "
            "(N, D) or images (N, H, W), (N, C, H, W), (N, H, W, C) with C in {1, 3}"
        )
    n = data.shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu" or (n and labels.min() < 0):
            raise LitGenError(
                f"{where}: labels must be non-negative integers of shape ({n},), got shape {labels.shape} and "
                f"dtype {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        if class_names is None:
            class_names = [str(k) for k in range(int(labels.max()) + 1)]

    lo, hi = float(np.min(data)), float(np.max(data))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise LitGenError(f"{where} contains NaN or infinite values")

    if data.ndim == 2:
        if image_size is not None:
            raise LitGenError(f"{where} holds points (N, D); --image-size applies to images only")
        return _Source(
            "points",
            [int(data.shape[1])],
            n,
            lambda i: np.asarray(data[i], dtype=np.float32),
            labels,
            class_names or [],
        )

    if data.ndim == 3:
        layout = "NHW"
    elif data.shape[1] in (1, 3):
        layout = "NCHW"
    elif data.shape[3] in (1, 3):
        layout = "NHWC"
    else:
        raise LitGenError(
            f"{where} holds a 4-D array of shape {tuple(data.shape)}; images need 1 or 3 channels on axis 1 (NCHW) "
            "or on the last axis (NHWC)"
        )

    if data.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise LitGenError(f"{where}: integer images must lie in 0..255, found {lo:g}..{hi:g}")

        def to_uint8(v: np.ndarray) -> np.ndarray:
            return np.asarray(v).astype(np.uint8)
    elif lo >= 0.0 and hi <= 1.0:

        def to_uint8(v: np.ndarray) -> np.ndarray:
            return np.rint(np.asarray(v, dtype=np.float64) * 255.0).astype(np.uint8)
    elif lo >= -1.0 and hi <= 1.0:

        def to_uint8(v: np.ndarray) -> np.ndarray:
            return np.rint((np.asarray(v, dtype=np.float64) + 1.0) * 127.5).astype(np.uint8)
    else:
        raise LitGenError(f"{where}: float images must lie in [0, 1] or [-1, 1], found [{lo:g}, {hi:g}]")

    def get(i: int) -> np.ndarray:
        v = data[i]
        chw = v[None] if layout == "NHW" else v if layout == "NCHW" else np.moveaxis(v, -1, 0)
        chw = to_uint8(chw)
        return chw if image_size is None else _resize_chw(chw, image_size)

    channels = 1 if layout == "NHW" else int(data.shape[1] if layout == "NCHW" else data.shape[3])
    height, width = data.shape[1:3] if layout in ("NHW", "NHWC") else data.shape[2:4]
    shape = [channels, image_size, image_size] if image_size else [channels, int(height), int(width)]
    return _Source("image", shape, n, get, labels, class_names or [])


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then centre-crop ``size x size``."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _resize_chw(chw: np.ndarray, size: int) -> np.ndarray:
    hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))
    image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    resized = np.asarray(_resize_crop(image, size))
    return resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_folder(root: Path, image_size: int | None) -> _Source:
    """Images directly in ``root`` (unconditional) or in its sub-folders (class = sub-folder name, sorted)."""
    top = sorted(p for p in root.iterdir() if _is_image_file(p))
    per_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted((p for p in sub.rglob("*") if _is_image_file(p)), key=lambda p: p.relative_to(sub).as_posix())
        if files:
            per_class[sub.name] = files
    if top and per_class:
        raise LitGenError(
            f"{root} has images both directly inside and in sub-folders ({', '.join(per_class)}); put every image "
            "in a class sub-folder, or all of them directly in the folder"
        )
    if not top and not per_class:
        raise LitGenError(f"{root} holds no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})")
    files = top or [f for fs in per_class.values() for f in fs]
    labels = None if top else np.concatenate([np.full(len(fs), k, np.int64) for k, fs in enumerate(per_class.values())])

    # Pass 1 reads headers only: the colour mode of the whole set, and the size check.
    gray, first_size = True, None
    for path in files:
        with _open_image(path) as image:
            gray = gray and image.mode in GRAY_MODES
            if image_size is None:
                if first_size is None:
                    first_size = (image.size, path)
                elif image.size != first_size[0]:
                    raise LitGenError(
                        f"images differ in size: {first_size[1]} is {first_size[0][0]}x{first_size[0][1]} but {path} "
                        f"is {image.size[0]}x{image.size[1]}; pass an image size to resize them"
                    )
    mode = "L" if gray else "RGB"
    channels = 1 if gray else 3
    shape = [channels, image_size, image_size] if image_size else [channels, first_size[0][1], first_size[0][0]]

    def get(i: int) -> np.ndarray:
        path = files[i]
        with _open_image(path) as image:
            try:
                image = image.convert(mode)
            except OSError as err:
                raise LitGenError(f"cannot decode the image {path}: {err}") from None
        if image_size is not None:
            image = _resize_crop(image, image_size)
        pixels = np.asarray(image)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    return _Source("image", shape, len(files), get, labels, list(per_class))


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise LitGenError(f"cannot read the image {path}: {err}") from None
