"""The WebDataset DataModule: shards -> normalised batches ``{"x": float32, "label": int64}``.

Training stream, per rank and DataLoader worker (``lit_gen.data.stream``)::

    shards (seeded draws, or a seeded split) -> tar -> per-sample mixing of sources -> shuffle buffer (seeded)
        -> decode (bad samples skipped and counted) -> tensors -> batches

Two modes:

- ``resampled=True`` (default): each rank and worker draws shards with replacement from its own seeded RNG, forever;
  epochs are cut at exactly ``steps_per_epoch`` batches on every rank, so ranks never wait on each other (the
  webdataset maintainers' advice against DDP hangs). Works with any number of shards, even fewer than ranks x
  workers. Several sources (``shards: "a/::b/"``) are mixed per sample with ``weights`` (default: their sizes).
- ``resampled=False`` (exact epochs): the shard list is split over ranks x workers (webdataset's
  ``split_by_node``/``split_by_worker`` in one step), so every sample is read exactly once per epoch. Needs at least
  ranks x workers shards (checked before training) and shard sizes (``dataset.json`` has them; local shards are
  counted otherwise). Each worker's last batch of an epoch may be partial. When ranks get unequal numbers of batches
  the shorter ones repeat their last batch, so every rank takes the same number of steps.

Labels: ``.cls`` when present; unconditional data gets 0; unlabelled sources mixed with labelled ones get the null
class ``num_classes``.

Bad data: a shard that cannot be opened or is truncated, a sample that does not decode, lacks its key or has the
wrong shape is skipped, counted and warned about (naming the shard); the count reaches the training process inside
the batches and is logged as ``data/skipped`` (every loss each time it is met, summed over ranks) and
``data/damaged`` (each damaged shard's loss and each undecodable sample counted once; the largest rank's count).
The ceiling judges the data set, not the first window read: the run stops with a one-line error only when the
damaged samples exceed ``max_skipped_fraction`` of the data set (of this rank's share in epoch mode; of the samples
read so far, after 10,000, when shard sizes are unknown), so a few damaged shards in a large data set are warned
about, counted, logged and summarised at the end of the fit, while a data set that cannot be read at all (no sample
decodes: a wrong kind or shape) stops before the first batch.

Exact resume: the stream position (batches delivered, and each worker's raw sample position on every rank) is saved
in the checkpoint, both in Lightning's fit-loop state (the loader is stateful) and in this DataModule's
``state_dict``. A resumed run sees exactly the batches the uninterrupted run would have seen, for any
``num_workers``, as long as world size, ``num_workers``, batch size, seed, mode and shards are unchanged. If any of
them changed (e.g. a different world size), a ``DataWarning`` says so and the stream restarts fresh, seeded by
``(seed, batches already delivered)``: no exact continuation, but no replay of the old run's first batches either.

Shard folders written with ``lit-gen shards --val-fraction`` (``DIR/train`` and ``DIR/val``) can be given as ``DIR``:
training then reads ``DIR/train`` and, unless ``val_shards`` is set, validation reads ``DIR/val``. ``DIR/train``
itself works too (then no validation unless ``val_shards``).
"""

from __future__ import annotations

import glob
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
import torch
import webdataset as wds

from lit_gen.data.info import INFO_NAME, check_compatible, read_info
from lit_gen.data.stream import (
    Collate,
    DataWarning,
    SampleDecoder,
    ShardStream,
    Source,
    StreamLoader,
    decode_npy,
    fingerprint,
    rank_batches,
)
from lit_gen.errors import LitGenError

__all__ = ["DataWarning", "ShardDataModule", "decode_npy", "resolve_shards"]

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # "http://...", "s3://...", "pipe:..."; not "C:\\" (one letter)


def _is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url)) and not url.startswith("file:") and not re.match(r"^[a-zA-Z]:[\\/]", url)


def resolve_shards(spec: str) -> list[str]:
    """Expand a shard specification into a list of shard URLs/paths.

    Args:
        spec: A folder (all ``*.tar`` in it, sorted; a folder holding ``train/`` from ``lit-gen shards
            --val-fraction`` means its ``train/``), a glob (``data/*.tar``), a brace pattern
            (``data/shard-{000000..000009}.tar``), or URLs webdataset opens (``https://...``, ``pipe:...``,
            ``s3://...`` through its ``pipe:`` handlers); several specifications may be joined with ``::``.

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
            path = _split_folder(Path(local).expanduser())
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


def _split_folder(path: Path) -> Path:
    """``DIR`` written with ``--val-fraction`` (no shards, a ``train/`` with ``dataset.json``) -> ``DIR/train``."""
    if path.is_dir() and not any(path.glob("*.tar")) and (path / "train" / INFO_NAME).is_file():
        return path / "train"
    return path


def _shard_sizes(urls: list[str], info: dict[str, Any], count: bool) -> tuple[int, ...] | None:
    """Samples per shard: from ``dataset.json`` (``shard_sizes``), else counted in local tars when ``count``."""
    known = dict(zip(info.get("shards", []), info.get("shard_sizes", []), strict=False))
    names = [Path(u).name for u in urls]
    if all(n in known for n in names):
        return tuple(int(known[n]) for n in names)
    if not count:
        return None
    sizes = []
    for url in urls:
        if _is_remote(url):
            raise LitGenError(
                f"resampled=False needs the size of every shard, and {url} is remote and not listed with "
                f"shard_sizes in {INFO_NAME}; rewrite the shards with `lit-gen shards` or use resampled=True"
            )
        try:
            with tarfile.open(url) as tar:
                keys = {m.name.split("/")[-1].split(".", 1)[0] for m in tar.getmembers() if m.isreg()}
        except (OSError, tarfile.TarError) as err:
            raise LitGenError(f"cannot count the samples in {url}: {err}") from None
        sizes.append(len(keys))
    return tuple(sizes)


class ShardDataModule(L.LightningDataModule):
    """Batches ``{"x": float32 [B, C, H, W] in [-1, 1] or [B, D], "label": int64 [B]}`` from WebDataset shards.

    The shard lists and ``dataset.json`` files are resolved here, in the constructor, so missing data fails before
    training; see the module docstring for the modes, mixing, bad data and resume.

    Args:
        shards: Training shards: a folder (all ``*.tar`` in it; a ``--val-fraction`` output folder means its
            ``train/``), a glob (``data/*.tar``), a brace pattern (``data/shard-{000000..000009}.tar``) or URLs
            webdataset opens. ``dataset.json`` is read from beside the first shard when it is local; remote shards
            need ``info_file``. Several sources joined with ``::`` (``"a/::b/"``) are mixed (see ``weights``).
        batch_size: Samples per batch on each rank (every batch is full in resampled mode).
        global_batch_size: Samples per optimizer step over all ranks (and gradient-accumulation steps); when given it
            replaces ``batch_size``, which becomes global_batch_size / (world size x accumulate_grad_batches), and a
            global batch that does not divide evenly is a one-line error before any work.
        cache_mb: MiB of decoded training samples each reading process (the trainer, or each worker) may keep in
            memory (0: none). Shards read whole are kept decoded, so later passes skip tar parsing and decoding; the
            batches, their order, skip counts and resume positions are exactly those without the cache. For data
            sets that fit (digits, toy 2-D, CIFAR-10: ~200 MiB as uint8).
        num_workers: DataLoader worker processes per rank (0: load in the training process).
        shuffle_buffer: Samples held in the shuffle buffer (<= 1: no sample shuffling).
        seed: Seed of the shard sampling, the mixing and the shuffle buffer.
        val_shards: Validation shards, same forms as ``shards``; every rank reads all of them in order, so all ranks
            see the same number of batches. None: ``DIR/val`` when ``shards`` is a ``--val-fraction`` output
            folder ``DIR``, else no validation loader.
        val_batch_size: Validation batch size (default: ``batch_size``); the last batch may be smaller.
        steps_per_epoch: Batches per training epoch on every rank, resampled mode only (default: num_samples //
            (batch_size * world_size), at least 1).
        info_file: Path of the ``dataset.json`` to use instead of the ones beside the shards (for every source).
        weights: Mixing weights of the ``::``-separated sources, one each (normalised; resampled mode). Default:
            proportional to their sample counts, i.e. every sample equally likely.
        resampled: True: endless seeded resampling of shards, fixed-length epochs. False: exact epochs, every
            sample once per epoch, shards split over ranks and workers.
        max_skipped_fraction: Stop the run with an error when more than this fraction of the data set is found
            damaged (broken shards' losses and undecodable samples, each counted once; see above).
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
        weights: list[float] | None = None,
        resampled: bool = True,
        max_skipped_fraction: float = 0.1,
        global_batch_size: int | None = None,
        cache_mb: float = 0.0,
    ) -> None:
        super().__init__()
        # Kept in checkpoints but not merged into the logger's hparams: Lightning refuses to log a key that the model
        # also has with another value (`seed` of TRACT/CD vs `data.seed`) with a traceback; the full configuration
        # is in the run's config.yaml (LightningCLI's SaveConfigCallback) anyway.
        self.save_hyperparameters(logger=False)
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise LitGenError(f"batch sizes must be at least 1, got {batch_size} and {val_batch_size}")
        if num_workers < 0:
            raise LitGenError(f"num_workers must be >= 0, got {num_workers}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise LitGenError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if steps_per_epoch is not None and not resampled:
            raise LitGenError("steps_per_epoch applies to resampled=True; exact epochs are as long as the data")
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise LitGenError(f"max_skipped_fraction must lie in [0, 1], got {max_skipped_fraction}")
        if global_batch_size is not None and global_batch_size < 1:
            raise LitGenError(f"global_batch_size must be at least 1, got {global_batch_size}")
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        if cache_mb < 0:
            raise LitGenError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_mb = cache_mb
        self._val_batch_size_given = val_batch_size is not None
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_batch_size = val_batch_size or batch_size
        self.steps_per_epoch = steps_per_epoch
        self.resampled = resampled
        self.max_skipped_fraction = max_skipped_fraction

        parts = shards.split("::")
        if weights is not None:
            if len(weights) != len(parts):
                raise LitGenError(f"{len(weights)} weights for {len(parts)} shard sources in {shards!r}")
            if any(w <= 0 for w in weights):
                raise LitGenError(f"mixing weights must be positive, got {weights}")
            if not resampled:
                raise LitGenError("mixing weights need resampled=True (exact epochs read every sample once)")
        part_urls = [resolve_shards(p) for p in parts]
        infos = [self._read_info(u, info_file, p) for u, p in zip(part_urls, parts, strict=True)]
        self._info = self._merge_infos(infos, parts)
        classes = self._info["num_classes"]
        self.sources = [
            Source(
                urls=tuple(u),
                sizes=_shard_sizes(u, i, count=not resampled),
                labelled=int(i.get("num_classes", 0) or 0) > 0 or classes == 0,
                weight=float(weights[k] if weights is not None else i["num_samples"]),
            )
            for k, (u, i) in enumerate(zip(part_urls, infos, strict=True))
        ]
        self.urls = [u for s in self.sources for u in s.urls]

        if val_shards is None and len(parts) == 1 and not _is_remote(parts[0]):
            parent = Path(parts[0]).expanduser()
            if _split_folder(parent) != parent and (parent / "val" / INFO_NAME).is_file():
                val_shards = str(parent / "val")
        self.val_urls: list[str] | None = None
        if val_shards is not None:
            self.val_urls = resolve_shards(val_shards)
            self._check_val_info(val_shards)
        else:
            # No hook at all (rather than an empty loader): Lightning then skips validation without warnings.
            self.val_dataloader = None  # type: ignore[method-assign,assignment]
            self.test_dataloader = None  # type: ignore[method-assign,assignment]
        self._train_loader: StreamLoader | None = None
        self._pending_state: dict[str, Any] = {}

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

    @staticmethod
    def _merge_infos(infos: list[dict[str, Any]], parts: list[str]) -> dict[str, Any]:
        """One description for a mixture: same kind and shape, same classes where labelled, summed sizes."""
        first = infos[0]
        labelled = [i for i in infos if int(i.get("num_classes", 0) or 0) > 0]
        for info, part in zip(infos[1:], parts[1:], strict=True):
            if (info["kind"], list(info["shape"])) != (first["kind"], list(first["shape"])):
                raise LitGenError(
                    f"shard source {part!r} holds {info['kind']} {info['shape']} but {parts[0]!r} holds "
                    f"{first['kind']} {first['shape']}; mixed sources must match"
                )
            check_compatible(first, info, f"shard source {parts[0]!r}", "holds")  # latents: the same VAE
            if info["normalize"] != first["normalize"]:
                warnings.warn(
                    f"shard source {part!r} has its own normalisation; all sources use the one of {parts[0]!r}",
                    DataWarning,
                    2,
                )
        for info in labelled[1:]:
            if info.get("class_names") != labelled[0].get("class_names"):
                raise LitGenError("mixed labelled shard sources must have the same classes (class_names)")
        merged = dict(labelled[0] if labelled else first)
        merged["normalize"] = first["normalize"]
        merged["num_samples"] = sum(int(i["num_samples"]) for i in infos)
        if len(infos) > 1:
            merged["sources"] = list(parts)
        return merged

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
        check_compatible(self._info, val_info, "the training shards", "hold")  # latents: the same VAE

    @property
    def info(self) -> dict[str, Any]:
        """The training shards' ``dataset.json`` content (merged over mixed sources)."""
        return self._info

    def resolve_batch_size(self, world_size: int, accumulate: int = 1) -> int:
        """The per-rank batch size; with ``global_batch_size`` it is derived here (called by ``lit-gen fit`` before
        any process starts, and again in ``setup``).

        Raises:
            LitGenError: When ``global_batch_size`` is not a multiple of world_size x accumulate.
        """
        if self.global_batch_size is None:
            return self.batch_size
        slots = max(1, int(world_size)) * max(1, int(accumulate))
        if self.global_batch_size % slots:
            lower = max(slots, self.global_batch_size // slots * slots)
            raise LitGenError(
                f"global_batch_size {self.global_batch_size} does not divide across {world_size} device(s) x "
                f"{accumulate} accumulation step(s) = {slots}; use a multiple of {slots} (e.g. {lower} or "
                f"{lower + slots}), or set data.batch_size per device instead"
            )
        self.batch_size = self.global_batch_size // slots
        if not self._val_batch_size_given:
            self.val_batch_size = self.batch_size
        return self.batch_size

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        _, world = self._rank_world()
        self.resolve_batch_size(world, trainer.accumulate_grad_batches if trainer is not None else 1)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def num_batches_per_epoch(self) -> int:
        """Training batches per epoch on each rank.

        Raises:
            LitGenError: In exact-epoch mode, when there are fewer shards than ranks x workers.
        """
        _, world = self._rank_world()
        if not self.resampled:
            slots = world * max(1, self.num_workers)
            if len(self.urls) < slots:
                raise LitGenError(
                    f"resampled=False splits the shards over ranks x workers = {world} x {max(1, self.num_workers)}, "
                    f"but there are only {len(self.urls)} shard(s); write smaller shards (--shard-size), use fewer "
                    "workers, or resampled=True"
                )
            per_rank = rank_batches(self.sources, world, max(1, self.num_workers), self.batch_size)
            if min(per_rank) != max(per_rank):
                warnings.warn(
                    f"resampled=False: ranks get {min(per_rank)} to {max(per_rank)} batches per epoch; the shorter "
                    f"ranks repeat their last batch to keep step with the others (make the number of shards a "
                    f"multiple of ranks x workers, with equal sizes, for exact epochs)",
                    DataWarning,
                    2,
                )
            return max(per_rank)
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return max(1, int(self._info["num_samples"]) // (self.batch_size * world))

    def train_dataloader(self) -> StreamLoader:
        """The training stream (see the module docstring), continuing from the saved position after a resume."""
        rank, world = self._rank_world()
        steps = self.num_batches_per_epoch()
        stream = ShardStream(
            self.sources,
            self._info,
            self.batch_size,
            self.shuffle_buffer,
            self.seed,
            rank,
            world,
            self.resampled,
            cache_mb=self.cache_mb,
        )
        # A rebuilt loader (Lightning #20550, reload_dataloaders_every_n_epochs) continues where the last one was.
        state = self._train_loader.state_dict() if self._train_loader is not None else self._pending_state
        if self._train_loader is not None:
            self._train_loader.close()
        self._train_loader = StreamLoader(
            stream, self.num_workers, steps, self.max_skipped_fraction, state, fingerprint(self.sources)
        )
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """The training stream position (empty before the first training loader exists)."""
        if self._train_loader is not None:
            return {"train_stream": self._train_loader.state_dict()}
        return {"train_stream": self._pending_state} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream from a checkpoint (applied when the training loader is made).

        Args:
            state_dict: What ``state_dict()`` returned.
        """
        self._pending_state = dict(state_dict.get("train_stream") or {})
        if self._train_loader is not None and self._pending_state:
            self._train_loader.load_state_dict(self._pending_state)

    def data_stats(self) -> dict[str, int]:
        """Counters of this rank's training stream: batches and samples delivered, samples skipped (each time met)
        and damaged (distinct)."""
        loader = self._train_loader
        if loader is None:
            return {"batches": 0, "samples": 0, "skipped": 0, "damaged": 0}
        return {
            "batches": loader.delivered,
            "samples": loader.samples,
            "skipped": loader.skipped,
            "damaged": loader.damaged,
        }

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Log ``data/skipped`` (summed over ranks) and ``data/damaged`` (largest rank) every ``log_every_n_steps``
        training steps."""
        trainer = self.trainer
        if trainer is None or not trainer.training or not trainer.loggers or self._train_loader is None:
            return batch
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            device = trainer.strategy.root_device
            skipped = torch.tensor([float(self._train_loader.skipped)], device=device)
            damaged = torch.tensor([float(self._train_loader.damaged)], device=device)
            if trainer.world_size > 1:
                skipped = trainer.strategy.reduce(skipped, reduce_op="sum")
                damaged = trainer.strategy.reduce(damaged, reduce_op="max")
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    metrics = {"data/skipped": float(skipped[0]), "data/damaged": float(damaged[0])}
                    logger.log_metrics(metrics, step=trainer.global_step)
        return batch

    def teardown(self, stage: str) -> None:
        """Stop the training stream's worker processes; after a fit, one line on the damaged data it met."""
        if self._train_loader is None:
            return
        self._train_loader.close()
        summary = self._train_loader.damage_summary()
        trainer = getattr(self, "trainer", None)
        if summary and stage == "fit" and (trainer is None or trainer.is_global_zero):
            warnings.warn(f"data: {summary}", DataWarning, 1)

    def _decode_stages(self) -> list[Any]:
        decoder = SampleDecoder(self._info["kind"], self._info["shape"])
        return [wds.map(decoder, handler=wds.warn_and_continue)]

    def val_dataloader(self) -> wds.WebLoader:
        """Validation batches (only with validation shards): every shard in order, unshuffled; unreadable samples
        and shards are skipped with a warning."""
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            *self._decode_stages(),
            wds.batched(self.val_batch_size, collation_fn=Collate(self._info), partial=True),
        )
        workers = min(self.num_workers, len(self.val_urls))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def test_dataloader(self) -> wds.WebLoader:
        """``lit-gen test`` evaluates on the validation shards (``val_shards``)."""
        return self.val_dataloader()
