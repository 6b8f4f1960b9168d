"""The WebDataset DataModule: shards -> normalised batches ``{"x": float32, "label": int64}``.

Training stream (per rank, per DataLoader worker)::

    ResampledShards(seeded, deterministic) -> tar -> shuffle buffer (seeded) -> decode -> tensors -> batched(full)

The stream is infinite and cut into epochs of exactly ``steps_per_epoch`` batches on every rank, so ranks never
disagree about the epoch length (which would hang DDP). Shards are drawn with replacement, each rank and worker
with its own seed; that replaces ``split_by_node``/``split_by_worker`` (splitting an infinite resampled stream would
only throw shards away, and splitting a finite list leaves ranks empty when there are fewer shards than ranks).

Everything is seeded by ``(seed, rank, worker, epoch)``, so with the same seed and world size the stream is the
same run after run. (Restoring the exact stream position on resume is a separate step: it needs the count of batches
drawn, saved in the checkpoint, on top of this seeded stream.)
"""

from __future__ import annotations

import functools
import glob
import io
import math
import random
import re
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
import numpy as np
import torch
import webdataset as wds

from lit_gen.data.info import INFO_NAME, normalize, read_info
from lit_gen.errors import LitGenError

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # "http://...", "s3://...", "pipe:..."; not "C:\\" (one letter)


def _is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url)) and not url.startswith("file:") and not re.match(r"^[a-zA-Z]:[\\/]", url)


def resolve_shards(spec: str) -> list[str]:
    """Expand a shard specification into a list of shard URLs/paths.

    Args:
        spec: A folder (all ``*.tar`` in it, sorted), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``), or URLs webdataset opens (``https://...``, ``pipe:...``);
            several specifications may be joined with ``::``.

    Raises:
        LitGenError: When a local folder or file does not exist, or nothing matches.
    """
    urls: list[str] = []
    for part in spec.split("::"):
        for item in braceexpand.braceexpand(part):
            if _is_remote(item):
                urls.append(item)
                continue
            local = re.sub(r"^file://?", "", item)
            path = Path(local).expanduser()
            if path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise LitGenError(f"no *.tar shards in {path}; write some with `lit-gen shards SRC --out {path}`")
                urls.extend(found)
            elif glob.has_magic(local):
                found = sorted(glob.glob(str(path)))
                if not found:
                    raise LitGenError(f"no shards match {local}")
                urls.extend(found)
            elif path.is_file():
                urls.append(str(path))
            else:
                raise LitGenError(f"shard source {path} does not exist")
    if not urls:
        raise LitGenError(f"no shards in {spec!r}")
    return list(dict.fromkeys(urls))


def _rank_worker_seed(rank: int) -> int:
    """Per-(rank, worker) seed for ``ResampledShards`` (the rank is fixed in the main process: spawned workers
    cannot see the process group)."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


class SeededShuffle(wds.PipelineStage):
    """webdataset's shuffle buffer, reseeded per (seed, rank, worker, epoch).

    ``wds.shuffle(seed=...)`` gives every rank and worker the same permutation and ``wds.detshuffle`` ignores rank
    and worker; with fewer shards than ranks, ranks that draw the same shard would then see identical batches.

    Args:
        bufsize: Samples held in the buffer (<= 1: no shuffling).
        seed: Base seed.
        rank: Global rank of the process that builds the pipeline.
    """

    def __init__(self, bufsize: int, seed: int, rank: int) -> None:
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, -1

    def run(self, src: Any) -> Any:
        self.epoch += 1
        if self.bufsize <= 1:
            return src
        rng = random.Random(wds.utils.make_seed(self.seed, _rank_worker_seed(self.rank), self.epoch))
        return wds.shuffle(self.bufsize, self.bufsize, rng=rng)(src)


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of an .npy header, parsed once per distinct header."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return dtype, shape, fortran, stream.tell()


def decode_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes; the header is parsed once per distinct header (np.load parses it for every sample, which
    made point decoding cost ~25 us/sample, as much as reading the tar)."""
    if data[6:7] == b"\x01":
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran, offset = _npy_header(bytes(data[:end]))
    if dtype.hasobject:
        raise LitGenError("refusing an .npy sample holding Python objects")
    array = np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape)) if shape else 1)
    return array.reshape(shape, order="F" if fortran else "C")


def _to_pair(sample: dict[str, Any], kind: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """Decoded sample -> (raw tensor in the dataset's shape, class index; 0 without classes)."""
    x = sample["png"] if kind == "image" else torch.from_numpy(decode_npy(sample["npy"]).copy())
    if x.numel() != math.prod(shape):
        raise LitGenError(
            f"sample {sample['__key__']} in {sample.get('__url__', '?')} has shape {tuple(x.shape)}, but {INFO_NAME} "
            f"says {list(shape)}"
        )
    return x.reshape(shape), int(sample.get("cls", 0))


class _Collate:
    """Stack raw samples and normalise them per ``dataset.json`` (a class, so spawned workers can pickle it)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        x = torch.stack([s[0] for s in samples])
        return {
            "x": normalize(x, self.info).to(torch.float32),
            "label": torch.tensor([s[1] for s in samples], dtype=torch.int64),
        }


class ShardDataModule(L.LightningDataModule):
    """Batches ``{"x": float32 [B, C, H, W] in [-1, 1] or [B, D], "label": int64 [B]}`` from WebDataset shards.

    The shard list and ``dataset.json`` are resolved here, in the constructor, so missing data fails before training.

    Args:
        shards: Training shards: a folder (all ``*.tar`` in it), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``) or URLs webdataset opens. ``dataset.json`` is read from beside the
            first shard when it is local; remote shards need ``info_file``.
        batch_size: Samples per batch on each rank (every batch is full).
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        shuffle_buffer: Samples held in the shuffle buffer (<= 1: no sample shuffling).
        seed: Seed of the shard sampling and the shuffle buffer.
        val_shards: Validation shards, same forms as ``shards``; every rank reads all of them in order, so all ranks
            see the same number of batches. None: no validation loader.
        val_batch_size: Validation batch size (default: ``batch_size``); the last batch may be smaller.
        steps_per_epoch: Batches per training epoch on every rank (default: num_samples // (batch_size * world_size),
            at least 1).
        info_file: Path of the ``dataset.json`` to use instead of the one beside the shards.
    """

    def __init__(
        self,
        shards: str,
        batch_size: int = 256,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_shards: str | None = None,
        val_batch_size: int | None = None,
        steps_per_epoch: int | None = None,
        info_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise LitGenError(f"batch sizes must be at least 1, got {batch_size} and {val_batch_size}")
        if num_workers < 0:
            raise LitGenError(f"num_workers must be >= 0, got {num_workers}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise LitGenError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_batch_size = val_batch_size or batch_size
        self.steps_per_epoch = steps_per_epoch
        self.urls = resolve_shards(shards)
        self._info = self._read_info(self.urls, info_file, shards)
        self.val_urls: list[str] | None = None
        if val_shards is not None:
            self.val_urls = resolve_shards(val_shards)
            self._check_val_info(val_shards)
        else:
            # No hook at all (rather than an empty loader): Lightning then skips validation without warnings.
            self.val_dataloader = None  # type: ignore[method-assign,assignment]
            self.test_dataloader = None  # type: ignore[method-assign,assignment]

    @staticmethod
    def _read_info(urls: list[str], info_file: str | None, spec: str) -> dict[str, Any]:
        if info_file is not None:
            return read_info(info_file)
        if _is_remote(urls[0]):
            raise LitGenError(
                f"the shards {spec!r} are not local, so their {INFO_NAME} cannot be found beside them; pass a local "
                f"copy as info_file (--data.info_file PATH)"
            )
        return read_info(Path(urls[0]).parent / INFO_NAME)

    def _check_val_info(self, spec: str) -> None:
        """Validation data is normalised like the training data; it must at least have the same kind and shape."""
        first = self.val_urls[0]
        if _is_remote(first) or not (Path(first).parent / INFO_NAME).is_file():
            return
        val_info = read_info(Path(first).parent / INFO_NAME)
        if (val_info["kind"], list(val_info["shape"])) != (self._info["kind"], list(self._info["shape"])):
            raise LitGenError(
                f"validation shards {spec!r} hold {val_info['kind']} {val_info['shape']} but the training shards hold "
                f"{self._info['kind']} {self._info['shape']}"
            )

    @property
    def info(self) -> dict[str, Any]:
        """The training shards' ``dataset.json`` content."""
        return self._info

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _decode_stages(self) -> list[Any]:
        kind, shape = self._info["kind"], tuple(int(s) for s in self._info["shape"])
        stages = []
        if kind == "image":
            stages.append(wds.decode(wds.imagehandler("torchl8" if shape[0] == 1 else "torchrgb8")))
        # Points: "npy" bytes are decoded in _to_pair by decode_npy (no generic decoder pass needed).
        stages.append(wds.map(functools.partial(_to_pair, kind=kind, shape=shape)))
        return stages

    def num_batches_per_epoch(self) -> int:
        """Training batches per epoch on each rank."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        _, world = self._rank_world()
        return max(1, int(self._info["num_samples"]) // (self.batch_size * world))

    def train_dataloader(self) -> wds.WebLoader:
        """An endless seeded stream of full batches, cut into epochs of ``num_batches_per_epoch()`` batches."""
        rank, _ = self._rank_world()
        steps = self.num_batches_per_epoch()
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.urls, seed=self.seed, worker_seed=functools.partial(_rank_worker_seed, rank), deterministic=True
            ),
            wds.tarfile_to_samples(),
            SeededShuffle(self.shuffle_buffer, self.seed, rank),  # before decoding: the buffer holds encoded bytes
            *self._decode_stages(),
            wds.batched(self.batch_size, collation_fn=_Collate(self._info), partial=False),
        )
        # Persistent workers keep their copy of the pipeline, so its epoch counters advance and each epoch draws new
        # shards; fresh workers would restart from the same seed every epoch.
        loader = wds.WebLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )
        return loader.with_epoch(steps).with_length(steps, silent=True)

    def val_dataloader(self) -> wds.WebLoader:
        """Validation batches (only when ``val_shards`` was given): every shard in order, unshuffled."""
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(),
            *self._decode_stages(),
            wds.batched(self.val_batch_size, collation_fn=_Collate(self._info), partial=True),
        )
        workers = min(self.num_workers, len(self.val_urls))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def test_dataloader(self) -> wds.WebLoader:
        """``lit-gen test`` evaluates on the validation shards (``val_shards``)."""
        return self.val_dataloader()
