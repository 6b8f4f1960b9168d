"""The training stream behind ``ShardDataModule``: seeded shard reading, mixing, bad-data handling, exact resume.

Two layers:

- ``ShardStream`` (a ``torch`` ``IterableDataset``) runs in each DataLoader worker (or in the training process with
  ``num_workers=0``) and yields collated batches. Every worker reads its own deterministic sample stream, a pure
  function of ``(seed, rank, worker slot)``: shards drawn with a seeded RNG (resampled mode) or a seeded split of the
  shard list (epoch mode), read with webdataset's tar iterators, mixed per sample across sources, shuffled by a
  seeded buffer, then decoded and batched. Each batch also carries bookkeeping (``_raw``: samples the worker's stream
  has consumed so far, ``_skipped``: samples lost since its previous batch, ``_slot``) that the main process strips.
- ``StreamLoader`` is what ``train_dataloader`` returns. It lives in the training process, owns the torch
  ``DataLoader`` and counts what it delivered; its ``state_dict`` is the stream position saved in checkpoints.

Exact resume (resampled mode, any ``num_workers``): torch's DataLoader hands out the batches of an infinite iterable
dataset round-robin over its workers, so with ``W`` workers global batch ``g`` is batch ``g // W`` of worker slot
``g % W``. After ``s`` batches, a new DataLoader's worker ``w`` plays slot ``(s + w) % W`` (its first batch is global
batch ``s + w``) and fast-forwards that slot's stream to the saved raw position without decoding the skipped samples
(only their bytes are read again). Skipped bad samples are accounted for because positions are counted in raw
samples. Positions of every rank are gathered into the checkpoint (Lightning writes only rank 0's copy). Each slot's
stream is a chain of independently seeded segments of ``SEGMENT`` (2**20) raw samples, so a resume re-reads at most
one segment (measured here: ~10,000 PNG samples/s per worker, i.e. under two minutes) however long the run was.

Epoch mode (``resampled=False``): shards are split over ``ranks x workers`` slots (``split_by_node`` and
``split_by_worker`` in one step), so every sample is read exactly once per epoch. A resume inside an epoch re-opens
that epoch and drops the batches already delivered (they are decoded again: at most one epoch of decoding).

A change of world size, ``num_workers``, batch size, seed, mode or shard list between save and resume cannot be
mapped onto the old stream: the loader warns and starts a fresh stream seeded by ``(seed, batches delivered so
far)``, so it neither replays the old run's first samples nor claims exactness. Counters carry over.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import random
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from lit_gen.data.info import INFO_NAME, normalize
from lit_gen.errors import LitGenError

STATE_VERSION = 1
SEGMENT = 2**20  # raw samples per independently seeded stream segment: bounds the re-reading a resume costs


class DataWarning(UserWarning):
    """A shard or sample was skipped, or a saved stream position could not be restored exactly."""


def seed_of(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (``numpy.random.SeedSequence``: independent of ``PYTHONHASHSEED``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Source:
    """One shard source of a mixture.

    Args:
        urls: Its shards.
        sizes: Samples per shard (from ``dataset.json`` or counted), None when unknown (remote shards).
        labelled: Whether its samples carry classes (``.cls``).
        weight: Mixing weight (resampled mode).
    """

    urls: tuple[str, ...]
    sizes: tuple[int, ...] | None
    labelled: bool
    weight: float


class _FatalDataError(Exception):
    """Raised inside a worker when the stream cannot go on (every shard fails); sent to the main process."""


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
    made point decoding cost ~25 us/sample, as much as reading the tar). Object arrays are refused (no pickle)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy bytes")
    if data[6:7] == b"\x01":
        end = 10 + int.from_bytes(data[8:10], "little")
    else:
        end = 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran, offset = _npy_header(bytes(data[:end]))
    if dtype.hasobject:
        raise ValueError("refusing an .npy sample holding Python objects")
    array = np.frombuffer(data, dtype=dtype, offset=offset, count=int(np.prod(shape)) if shape else 1)
    return array.reshape(shape, order="F" if fortran else "C")


class SampleDecoder:
    """Raw tar sample -> (uint8 or float tensor in the dataset's shape, class index). Raises on any problem (missing
    key, undecodable bytes, wrong shape), which the stream counts as a skipped sample.

    Args:
        kind: "image" (``.png``, decoded by webdataset's ``imagehandler``), "points" or "latent" (``.npy``).
        shape: The shape every sample must have (``dataset.json``).
        null_label: Class given to samples without ``.cls`` (0 for unconditional data; ``num_classes``, the null
            class, for unlabelled sources mixed with labelled ones).
    """

    def __init__(self, kind: str, shape: list[int] | tuple[int, ...], null_label: int = 0) -> None:
        self.kind, self.shape, self.null_label = kind, tuple(int(s) for s in shape), null_label
        self.numel = math.prod(self.shape)
        self.key = "png" if kind == "image" else "npy"
        self.image = wds.imagehandler("torchl8" if self.shape[0] == 1 else "torchrgb8") if kind == "image" else None

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        data = sample.get(self.key)
        if data is None:
            raise KeyError(f"no .{self.key} entry (has {', '.join(k for k in sample if not k.startswith('__'))})")
        if self.image is not None:
            x = self.image(self.key, data)
            x = x[None] if x.ndim == 2 else x  # "torchl8" gives (H, W)
            if tuple(x.shape) != self.shape:
                raise ValueError(f"shape {tuple(x.shape)}, but {INFO_NAME} says {list(self.shape)}")
        else:
            a = decode_npy(data)
            if a.size != self.numel:
                raise ValueError(f"shape {a.shape}, but {INFO_NAME} says {list(self.shape)}")
            x = torch.from_numpy(a.reshape(self.shape).copy())  # numpy's reshape: ~10x cheaper than torch's here
        cls = sample.get("cls")
        return x, (int(cls) if cls is not None else self.null_label)


class Collate:
    """Stack decoded samples and normalise them per ``dataset.json`` (a class, so spawned workers can pickle it)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        x = torch.stack([s[0] for s in samples])
        return {
            "x": normalize(x, self.info).to(torch.float32),
            "label": torch.tensor([s[1] for s in samples], dtype=torch.int64),
        }


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err.args[0] if err.args else err}"
    return " ".join(text.split())[:300]


class _Errors:
    """Per-worker count of skipped samples, one warning per shard (naming it), the damage the main process judges
    the data set by, and two guards against a stream that cannot make progress at all (it would otherwise loop over
    failing shards forever): shards that give no samples, and samples that never decode.

    ``skipped`` counts every loss, each time it is met (a truncated shard drawn again by the resampled stream loses
    its tail again): it is what the run could not train on, logged as ``data/skipped``. ``damage`` lists what was met
    since the last batch as identities — ``(url, lost)`` for a shard that broke off, ``(url, key)`` for a sample that
    did not decode — so that the loader counts each damaged shard's loss once (``StreamLoader.damaged``).
    """

    def __init__(self, give_up_after: int, never_decoded_after: int = 64) -> None:
        self.skipped = 0
        self.failed_shards = 0
        self.warned: set[str] = set()
        self.bad_shards_in_a_row = 0
        self.give_up_after = give_up_after
        self.broken: list[tuple[str, int]] = []  # (shard url, samples lost) since the last batch
        self.undecodable: list[tuple[str, str]] = []  # (shard url, sample key) since the last batch
        self.decoded = self.not_decoded = 0
        self.not_decoded_urls: set[str] = set()
        self.never_decoded_after = never_decoded_after
        self.first_error = ""

    def _warn(self, url: str, message: str) -> None:
        if url not in self.warned:
            self.warned.add(url)
            warnings.warn(f"{message} (further problems in this shard are counted silently)", DataWarning, 2)

    def sample(self, sample: dict[str, Any], err: BaseException, size: int | None = None) -> None:
        """A sample that did not decode. Every sample failing (a wrong ``kind`` or shape in ``dataset.json``, a
        decoder that cannot read this data) is systematic, not damage: after ``never_decoded_after`` failures from
        at least two shards (or the whole data set, ``size``) without one success the stream stops."""
        self.skipped += 1
        url, key = str(sample.get("__url__", "?")), str(sample.get("__key__", "?"))
        self.undecodable.append((url, key))
        self.not_decoded += 1
        self.not_decoded_urls.add(url)
        self.first_error = self.first_error or _one_line(err)
        self._warn(url, f"skipped sample {key} of shard {url}: {_one_line(err)}")
        if (
            not self.decoded
            and self.not_decoded >= self.never_decoded_after
            and (len(self.not_decoded_urls) >= 2 or (size is not None and self.not_decoded >= size))
        ):
            raise _FatalDataError(
                f"none of the first {self.not_decoded} samples (from {len(self.not_decoded_urls)} shards) could be "
                f"decoded: {self.first_error}; check the data kind and shape in dataset.json"
            )

    def shard(self, url: str, err: BaseException, read: int, expected: int | None) -> None:
        lost = max(1, expected - read) if expected is not None else 1
        self.skipped += lost
        self.failed_shards += 1
        self.broken.append((url, lost))
        self._warn(url, f"skipped the rest of shard {url} after {read} samples ({lost} lost): {_one_line(err)}")

    def take_damage(self) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
        """What was met since the last call (sent to the main process with the next batch)."""
        out = (self.broken, self.undecodable)
        self.broken, self.undecodable = [], []
        return out

    def progress(self, read: int, url: str, err: BaseException | None) -> None:
        self.bad_shards_in_a_row = 0 if read else self.bad_shards_in_a_row + 1
        if self.bad_shards_in_a_row >= self.give_up_after:
            raise _FatalDataError(
                f"{self.bad_shards_in_a_row} shards in a row gave no samples (last: {url}: "
                f"{_one_line(err) if err else 'empty'}); check the shard source"
            )


def read_shard(url: str, errors: _Errors, expected: int | None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard (webdataset's ``gopen`` + tar iterators, so any URL webdataset opens works).

    A shard that cannot be opened or breaks off (truncated, corrupt) ends early; the lost samples are counted
    (``expected - read`` when the shard size is known, else 1) and warned about.

    Args:
        url: The shard.
        errors: The worker's error counter.
        expected: Samples the shard should hold, None when unknown.
    """
    read, failure = 0, None
    try:
        stream = gopen(url)
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=wds.reraise_exception)
            for sample in group_by_keys(files, handler=wds.reraise_exception):
                read += 1
                yield sample
        finally:
            stream.close()
        if expected is not None and read < expected:
            raise EOFError(f"expected {expected} samples, found {read}")
    except Exception as err:  # a broken shard must not stop the run: count it, warn, go on
        failure = err
        errors.shard(url, err, read, expected)
    errors.progress(read, url, failure)


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of collated batches, read by each DataLoader worker (see the module docstring).

    Args:
        sources: The shard sources; several are mixed per sample with their weights (resampled mode) or
            concatenated (epoch mode).
        info: The merged ``dataset.json`` (kind, shape, normalisation, classes).
        batch_size: Samples per batch.
        shuffle_buffer: Samples held in the shuffle buffer (<= 1: none).
        seed: Base seed.
        rank: This process's global rank.
        world_size: Number of ranks.
        resampled: Infinite stream of shards drawn with replacement (True) or exact epochs over the split shards.
        cache_mb: Keep up to this many MiB of decoded samples per reading process (0: no cache). A shard read
            completely is kept decoded, and later reads of it skip tar parsing and decoding; samples, order, skips
            and resume positions are exactly those of the uncached stream. For data sets that fit in memory.
    """

    def __init__(
        self,
        sources: list[Source],
        info: dict[str, Any],
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        resampled: bool = True,
        cache_mb: float = 0.0,
    ) -> None:
        super().__init__()
        self.sources, self.info, self.batch_size = sources, info, batch_size
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        self.rank, self.world_size = rank, world_size
        classes = int(info.get("num_classes", 0) or 0)
        self.decoders = [SampleDecoder(info["kind"], info["shape"], 0 if s.labelled else classes) for s in sources]
        self.collate = Collate(info)
        self.num_urls = sum(len(s.urls) for s in sources)
        known = all(s.sizes is not None for s in sources)
        self.num_samples = sum(sum(s.sizes) for s in sources) if known else None  # type: ignore[arg-type]
        self.segment = SEGMENT
        # Set by StreamLoader before each DataLoader iterator is made (workers get a copy). Resampled mode:
        # {"start": batches this stream delivered, "seed": stream seed, "raw": {slot: raw position}}; epoch mode:
        # {"epoch": e}.
        self.plan: dict[str, Any] = {"start": 0, "seed": seed, "raw": {}, "epoch": 0}
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple[int, str], list[tuple[str, Any]]] = {}
        self._cached_bytes = 0

    # ------------------------------------------------------------------------------------------------ shard cache
    def _read(self, index: int, k: int, errors: _Errors) -> Iterator[dict[str, Any]]:
        """The samples of shard ``k`` of source ``index``; with the cache on, decoded (``__decoded__``: the decoder's
        output, or the exception it raised, re-raised where decoding would happen) and kept when the shard was read
        whole and fits in the budget."""
        source = self.sources[index]
        url, expected = source.urls[k], (source.sizes[k] if source.sizes else None)
        cached = self._cache.get((index, url))
        if cached is not None:
            for key, decoded in cached:
                yield {"__key__": key, "__url__": url, "__src__": index, "__decoded__": decoded}
            errors.progress(len(cached), url, None)
            return
        keep: list[tuple[str, Any]] | None = [] if self._cached_bytes < self.cache_bytes else None
        size, failures = 0, errors.failed_shards
        decoder = self.decoders[index]
        for sample in read_shard(url, errors, expected):
            sample["__src__"] = index
            if keep is not None:
                try:
                    decoded: Any = decoder(sample)
                    size += decoded[0].numel() * decoded[0].element_size() + 256  # + per-sample object overhead
                except Exception as err:  # counted where decoding would happen, every time it is read
                    decoded = err
                sample["__decoded__"] = decoded
                keep.append((str(sample.get("__key__", "?")), decoded))
            yield sample
        whole = errors.failed_shards == failures  # read_shard counted no break-off (truncated / corrupt tar)
        if keep is not None and whole and self._cached_bytes + size <= self.cache_bytes:
            self._cache[(index, url)] = keep
            self._cached_bytes += size

    # ------------------------------------------------------------------------------------------------ raw samples
    def _shards_forever(self, index: int, rng: random.Random, errors: _Errors) -> Iterator[dict[str, Any]]:
        source = self.sources[index]
        while True:
            yield from self._read(index, rng.randrange(len(source.urls)), errors)

    def _segment(self, slot: int, seed: int, segment: int, errors: _Errors) -> Iterator[dict[str, Any]]:
        """Endless raw (undecoded) samples of segment ``segment`` of worker slot ``slot`` on this rank: seeded shard
        draws per source, per-sample mixing, shuffle buffer."""
        streams = [
            self._shards_forever(i, random.Random(seed_of(seed, self.rank, slot, i, 1, segment)), errors)
            for i in range(len(self.sources))
        ]
        if len(streams) == 1:
            mixed = streams[0]
        else:  # per-sample mixture: source i with probability weight_i / sum(weights)
            weights = [s.weight for s in self.sources]
            rng = random.Random(seed_of(seed, self.rank, slot, 2, segment))
            mixed = (next(streams[rng.choices(range(len(streams)), weights)[0]]) for _ in itertools.count())
        return self._shuffled(mixed, seed_of(seed, self.rank, slot, 3, segment))

    def _resampled_raw(self, slot: int, seed: int, errors: _Errors, pos: int) -> Iterator[dict[str, Any]]:
        """The endless raw sample stream of worker slot ``slot``, from raw position ``pos`` on.

        The stream is a chain of independently seeded segments of ``self.segment`` samples, so reaching position
        ``pos`` re-reads at most one segment (eagerly, here, without decoding) however long the run has been. Each
        segment boundary drops what the shuffle buffer and the open shard still held (a few % of a segment)."""
        first, offset = divmod(pos, self.segment)
        head = self._segment(slot, seed, first, errors)
        for _ in itertools.islice(head, offset):  # fast-forward: bytes are read again, nothing is decoded
            pass

        def chain() -> Iterator[dict[str, Any]]:
            yield from itertools.islice(head, self.segment - offset)
            _close(head)
            for segment in itertools.count(first + 1):
                stream = self._segment(slot, seed, segment, errors)
                yield from itertools.islice(stream, self.segment)
                _close(stream)

        return chain()

    def _epoch_raw(self, slot: int, num_slots: int, epoch: int, errors: _Errors) -> Iterator[dict[str, Any]]:
        """Epoch mode: the samples of this slot's share of the shards, in a seeded per-epoch order."""
        shards = [(i, k) for i, s in enumerate(self.sources) for k in range(len(s.urls))][slot::num_slots]
        random.Random(seed_of(self.seed, epoch, slot, 4)).shuffle(shards)

        def samples() -> Iterator[dict[str, Any]]:
            for i, k in shards:
                yield from self._read(i, k, errors)

        return self._shuffled(samples(), seed_of(self.seed, epoch, slot, 5))

    def _shuffled(self, samples: Iterator[dict[str, Any]], seed: int) -> Iterator[dict[str, Any]]:
        """webdataset's shuffle buffer with its own seeded RNG. It holds encoded bytes: decoding comes after it, so
        samples fast-forwarded on resume are never decoded."""
        if self.shuffle_buffer <= 1:
            return samples
        return iter(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=random.Random(seed))(samples))

    # ---------------------------------------------------------------------------------------------------- batches
    def _batches(
        self, raw: Iterator[dict[str, Any]], pos: int, slot: int, errors: _Errors, partial: bool
    ) -> Iterator[dict[str, Any]]:
        reported = errors.skipped  # losses met while fast-forwarding were counted by the run that saw them
        batch: list[tuple[torch.Tensor, int]] = []
        decoders, size = self.decoders, self.batch_size  # locals: this loop runs once per sample
        for sample in raw:
            pos += 1
            try:
                decoded = sample.get("__decoded__")
                if decoded is None:
                    decoded = decoders[sample["__src__"]](sample)
                elif isinstance(decoded, Exception):
                    raise decoded
                batch.append(decoded)
                errors.decoded += 1
            except Exception as err:  # an undecodable sample is skipped and counted (fatal only if none decode)
                errors.sample(sample, err, self.num_samples)
                continue
            if len(batch) == size:
                yield self._emit(batch, pos, slot, errors.skipped - reported, errors)
                reported, batch = errors.skipped, []
        if partial and batch:
            yield self._emit(batch, pos, slot, errors.skipped - reported, errors)

    def _emit(
        self, batch: list[tuple[torch.Tensor, int]], pos: int, slot: int, skipped: int, errors: _Errors
    ) -> dict[str, Any]:
        out: dict[str, Any] = self.collate(batch)
        broken, undecodable = errors.take_damage()
        out.update(_raw=pos, _skipped=skipped, _slot=slot, _broken=broken, _undecodable=undecodable)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        errors = _Errors(give_up_after=max(16, 2 * self.num_urls))
        try:
            if self.resampled:
                start = int(self.plan["start"])
                slot = (start + worker) % workers
                pos = self.plan["raw"].get(slot)
                if pos is None:  # no saved raw position: exact as long as no sample was skipped before
                    pos = (start + worker) // workers * self.batch_size
                raw = self._resampled_raw(slot, int(self.plan["seed"]), errors, int(pos))
                yield from self._batches(raw, int(pos), slot, errors, partial=False)
            else:
                num_slots = self.world_size * workers
                slot = self.rank * workers + worker
                raw = self._epoch_raw(slot, num_slots, int(self.plan["epoch"]), errors)
                yield from self._batches(raw, 0, slot, errors, partial=True)
        except _FatalDataError as err:
            yield {"_error": str(err)}


def rank_batches(sources: list[Source], world_size: int, workers: int, batch_size: int) -> list[int]:
    """Epoch mode: batches per epoch of each rank (each worker's last batch may be partial); needs shard sizes."""
    sizes = [n for s in sources for n in s.sizes]
    num_slots = world_size * workers
    per_slot = [sum(sizes[slot::num_slots]) for slot in range(num_slots)]
    return [
        sum(math.ceil(n / batch_size) for n in per_slot[r * workers : (r + 1) * workers]) for r in range(world_size)
    ]


def fingerprint(sources: list[Source]) -> str:
    """A short hash of the shard lists and weights (a resumed run must read the same data to continue exactly)."""
    text = "|".join(",".join(s.urls) + f"@{s.weight:g}" for s in sources)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _close(stream: Iterator[Any]) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _shutdown(it: Any) -> None:
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


class StreamLoader:
    """The training loader: a torch ``DataLoader`` over a ``ShardStream``, cut into epochs of ``len(self)``
    batches, counting what it delivered so that ``state_dict()`` is the exact stream position.

    Lightning saves ``state_dict()`` with the fit loop (the loader is "stateful", so there is no "dataloader is not
    resumable" warning) and ``ShardDataModule`` saves it too (a copy that survives Lightning #20550, where the loop
    rebuilds its loader on resume and drops the loader's state).

    Args:
        dataset: The stream.
        num_workers: DataLoader worker processes (0: read in this process).
        batches_per_epoch: Batches per epoch.
        max_skipped_fraction: Stop with an error when the damaged samples found (``damaged``: each damaged shard's
            loss and each undecodable sample counted once, however often the stream meets them) exceed this
            fraction of the data set this rank reads (all of it when resampled, its share of the shards in epoch
            mode). When shard sizes are unknown (remote shards) the fraction is taken over the samples read so far,
            once ``min_samples_checked`` were read.
        state: A saved ``state_dict()`` to continue from.
        fingerprint: Identifies the shard lists (``fingerprint``).
        min_samples_checked: Samples read before the fraction is judged when shard sizes are unknown.
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int,
        batches_per_epoch: int,
        max_skipped_fraction: float,
        state: dict[str, Any] | None = None,
        fingerprint: str = "",
        min_samples_checked: int = 10_000,
    ) -> None:
        self.stream, self.num_workers, self.batches_per_epoch = dataset, num_workers, batches_per_epoch
        self.max_skipped_fraction, self.fingerprint = max_skipped_fraction, fingerprint
        self.min_samples_checked = min_samples_checked
        self.delivered = self.samples = self.skipped = self.origin = 0
        self.raw: dict[int, int] = {}
        self.broken: dict[str, int] = {}  # shard url -> samples it lost (the largest loss seen: counted once)
        self.undecodable: dict[str, set[str]] = {}  # shard url -> keys of its samples that did not decode
        self.judged_size = self._judged_size()
        self._it: Iterator[dict[str, Any]] | None = None
        self._finalizer: weakref.finalize | None = None
        self._it_epoch = -1
        self._last: dict[str, Any] | None = None
        if state:
            self.load_state_dict(state)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def workers(self) -> int:
        """Worker slots (1 when reading in the training process)."""
        return max(1, self.num_workers)

    def _judged_size(self) -> int | None:
        """Samples of the data set this rank reads (the denominator of the damaged fraction), None if unknown."""
        d = self.stream
        if any(src.sizes is None for src in d.sources):
            return None
        sizes = [n for src in d.sources for n in src.sizes]  # type: ignore[union-attr]
        if d.resampled:
            return sum(sizes)
        num_slots = d.world_size * self.workers
        return sum(sum(sizes[slot::num_slots]) for slot in range(d.rank * self.workers, (d.rank + 1) * self.workers))

    @property
    def damaged(self) -> int:
        """Distinct damaged samples found so far: every broken shard's loss once, every undecodable sample once."""
        return sum(self.broken.values()) + sum(len(keys) for keys in self.undecodable.values())

    def damage_summary(self) -> str:
        """One line on the damage found ('' when none), e.g. for the end of a run."""
        if not self.damaged:
            return ""
        shards = sorted(set(self.broken) | set(self.undecodable))
        share = f" ({self.damaged / self.judged_size:.2%} of the data set)" if self.judged_size else ""
        names = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        broken, undecodable = len(self.broken), sum(len(k) for k in self.undecodable.values())
        return (
            f"{self.damaged} damaged samples{share} were skipped: {broken} broken shard{'s' * (broken != 1)} lost "
            f"{sum(self.broken.values())}, {undecodable} sample{'s' * (undecodable != 1)} did not decode ({names}); "
            f"{self.skipped} sample reads were skipped in all"
        )

    def _open(self, plan: dict[str, Any]) -> None:
        self.close()
        self.stream.plan = plan
        # Its own generator: torch draws a base seed for the workers each time an iterator opens, which would
        # otherwise come from (and advance) the global RNG that training's noise is drawn from.
        generator = torch.Generator().manual_seed(seed_of(int(plan.get("seed", 0)), self.stream.rank, 6))
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, generator=generator
        )
        self._it = iter(loader)
        # The finalizer holds the iterator, so when this loader is garbage-collected (often inside a reference
        # cycle) the workers are shut down while their queues are still intact; left to the collector, torch's
        # iterator met half-finalised queues and took 5 s per worker to notice (measured).
        self._finalizer = weakref.finalize(self, _shutdown, self._it)

    def close(self) -> None:
        """Stop the worker processes (they stay up between epochs otherwise)."""
        self._it = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def _next(self) -> dict[str, Any]:
        batch = next(self._it)
        if "_error" in batch:
            raise LitGenError(batch["_error"])
        self.skipped += batch.pop("_skipped")
        for url, lost in batch.pop("_broken"):
            self.broken[url] = max(lost, self.broken.get(url, 0))
        for url, key in batch.pop("_undecodable"):
            self.undecodable.setdefault(url, set()).add(key)
        raw, slot = batch.pop("_raw"), batch.pop("_slot")
        if self.stream.resampled:
            self.raw[slot] = raw
        return batch

    def _account(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.delivered += 1
        self.samples += len(batch["label"])
        damaged = self.damaged
        if damaged and self.judged_size:
            if damaged > self.max_skipped_fraction * self.judged_size:
                raise LitGenError(
                    f"{damaged} of the data set's {self.judged_size} samples ({damaged / self.judged_size:.1%}) are "
                    f"damaged ({len(self.broken)} broken shard(s), {damaged - sum(self.broken.values())} undecodable "
                    f"sample(s)), more than max_skipped_fraction={self.max_skipped_fraction:g}; the warnings above "
                    "name the shards"
                )
        elif damaged:
            seen = self.samples + self.skipped
            if seen >= self.min_samples_checked and damaged > self.max_skipped_fraction * seen:
                raise LitGenError(
                    f"{damaged} of {seen} samples read ({damaged / seen:.1%}) were damaged, more than "
                    f"max_skipped_fraction={self.max_skipped_fraction:g}; the warnings above name the shards"
                )
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.stream.resampled:
            if self._it is None:
                seed = self.stream.seed if self.origin == 0 else seed_of(self.stream.seed, self.origin, 6)
                self._open({"start": self.delivered - self.origin, "seed": seed, "raw": dict(self.raw)})
            for _ in range(self.batches_per_epoch - self.delivered % self.batches_per_epoch):
                yield self._account(self._next())
            return
        epoch, offset = divmod(self.delivered, self.batches_per_epoch)
        if self._it is None or self._it_epoch != epoch:
            self._open({"epoch": epoch})
            self._it_epoch = epoch
            for _ in range(offset):  # resumed inside the epoch: drop what was delivered before the save
                self._next_or_repeat()
        for _ in range(self.batches_per_epoch - offset):
            yield self._account(self._next_or_repeat())
        self.close()

    def _next_or_repeat(self) -> dict[str, Any]:
        """Epoch mode: the next batch; a rank whose epoch ran short (uneven shards, skipped samples) repeats its
        last batch so that every rank takes the same number of steps (DDP would hang otherwise)."""
        try:
            batch = self._next()
        except StopIteration:
            if self._last is None:
                raise LitGenError("the epoch-mode stream of this rank is empty") from None
            batch = {k: v.clone() for k, v in self._last.items()}
        self._last = batch
        return batch

    # --------------------------------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        d = self.stream
        return {
            "world_size": d.world_size,
            "workers": self.workers,
            "batch_size": d.batch_size,
            "seed": d.seed,
            "resampled": d.resampled,
            "shards": self.fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        """The stream position: batches delivered, the counters, and every rank's raw positions (gathered here, so
        under DDP this must be called on all ranks at once, as Lightning's checkpointing does)."""
        raw = {str(k): int(v) for k, v in self.raw.items()}
        damage = {"broken": dict(self.broken), "undecodable": {u: sorted(k) for u, k in self.undecodable.items()}}
        ranks, damages = {str(self.stream.rank): raw}, {str(self.stream.rank): damage}
        if self.stream.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.stream.rank, raw, damage))
            ranks = {str(r): pos for r, pos, _ in gathered}
            damages = {str(r): dmg for r, _, dmg in gathered}
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "delivered": self.delivered,
            "origin": self.origin,
            "samples": self.samples,
            "skipped": self.skipped,
            "raw": ranks,
            "damage": damages,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see the module docstring for what happens when the setup changed).

        Args:
            state: A ``state_dict()``.
        """
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise LitGenError(f"the checkpoint's data state has version {state.get('version')!r}, expected 1")
        self.close()
        self._it_epoch = -1
        self.delivered, self.samples, self.skipped = (int(state[k]) for k in ("delivered", "samples", "skipped"))
        saved = {k: state.get(k) for k in self._identity()}
        self.broken, self.undecodable = {}, {}
        if saved.get("shards") == self.fingerprint:  # the same shards: what was found damaged stays known
            damages = state.get("damage", {})
            mine = damages.get(str(self.stream.rank))
            # Another world size: resampled ranks all read the whole data set, so every rank's finds apply; in epoch
            # mode the split changed and this rank starts counting afresh.
            found = [mine] if mine is not None else list(damages.values()) if self.stream.resampled else []
            for damage in found:
                for url, lost in damage["broken"].items():
                    self.broken[url] = max(int(lost), self.broken.get(url, 0))
                for url, keys in damage["undecodable"].items():
                    self.undecodable.setdefault(url, set()).update(keys)
        if saved == self._identity():
            self.origin = int(state.get("origin", 0))
            self.raw = {int(k): int(v) for k, v in state["raw"].get(str(self.stream.rank), {}).items()}
            return
        changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._identity().items() if saved[k] != v)
        warnings.warn(
            f"the data stream was saved with a different setup ({changed}); it cannot continue exactly, so it "
            f"restarts as a fresh stream seeded by (seed, {self.delivered} batches delivered)",
            DataWarning,
            2,
        )
        self.origin, self.raw = self.delivered, {}
