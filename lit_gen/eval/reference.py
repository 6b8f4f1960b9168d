"""Reference samples for evaluation, read straight from a shard folder written by ``lit-gen shards``.

The tar files are read with webdataset here (not through the training DataModule): evaluation wants every sample once,
in the stored order, in raw units (uint8 pixels ``(N, C, H, W)`` or float32 points ``(N, D)`` in data units), which is
what ``LoadedModel.sample`` returns for generated samples too. Shards are written in a seeded shuffled order, so the
first ``limit`` samples are a random subset of the data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lit_gen.data.info import INFO_NAME, read_info
from lit_gen.data.stream import decode_npy
from lit_gen.errors import LitGenError


def _decode(sample: dict[str, Any], kind: str, shape: list[int]) -> np.ndarray:
    if kind == "image":
        if "png" not in sample:
            raise LitGenError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no png image")
        with Image.open(io.BytesIO(sample["png"])) as image:
            pixels = np.asarray(image.convert("L" if shape[0] == 1 else "RGB"))
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        array = pixels
    else:
        if "npy" not in sample:
            raise LitGenError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no npy array")
        try:
            array = decode_npy(sample["npy"])  # the stream's decoder: header parsed once, object arrays refused
        except ValueError as err:
            raise LitGenError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: {err}") from None
    if array.size != int(np.prod(shape)):
        raise LitGenError(
            f"sample {sample.get('__key__')} in {sample.get('__url__')} has shape {list(array.shape)}, but "
            f"{INFO_NAME} says {list(shape)}"
        )
    return array.reshape(shape)


def read_reference(ref: str | Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The samples of a shard folder.

    Args:
        ref: The shard folder (or its ``dataset.json``).
        limit: Read at most this many samples (the first ones, in shard order); None: all.

    Returns:
        ``(x, labels, info)``: uint8 ``(N, C, H, W)`` images or float32 ``(N, D)`` points, int64 labels (0 without
        classes), and the folder's ``dataset.json``.
    """
    ref = Path(ref)
    folder = ref.parent if ref.name == INFO_NAME else ref
    if not folder.is_dir():
        raise LitGenError(
            f"reference shards {folder} do not exist; write them with `lit-gen shards SRC --out {folder}`"
        )
    info = read_info(folder)
    urls = [str(folder / name) for name in info["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise LitGenError(f"{folder / INFO_NAME} lists {missing[0]}, which does not exist; rewrite the shards")
    if limit is not None and limit < 2:
        raise LitGenError(f"the reference needs at least 2 samples, got a limit of {limit}")
    kind, shape = info["kind"], [int(s) for s in info["shape"]]
    xs: list[np.ndarray] = []
    labels: list[int] = []
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        xs.append(_decode(sample, kind, shape))
        labels.append(int(sample.get("cls", b"0")))
        if limit is not None and len(xs) >= limit:
            break
    if len(xs) < 2:
        raise LitGenError(f"reference shards {folder} hold {len(xs)} sample(s); at least 2 are needed")
    x = torch.from_numpy(np.stack(xs))
    return x, torch.tensor(labels, dtype=torch.int64), info
