"""Training-stream throughput: the lit_gen stream vs a plain webdataset pipeline with the same decode, same shards.

Both pipelines: resampled shards -> tar -> shuffle buffer (1000) -> decode (PNG via webdataset's ``imagehandler``,
or ``.npy`` via ``decode_npy``) -> uint8/float tensors -> batches of 256 normalised to float32 (``Collate``). lit_gen's
stream adds what plain webdataset lacks: seeded per-worker streams, raw-position bookkeeping for exact resume,
per-sample error handling and counting, mixing, and its main-process ``StreamLoader``. Both run in the calling process
(``num_workers=0``) so the ratio is not blurred by worker scheduling on a shared machine; a row with 2 DataLoader
workers for the lit_gen stream shows the scaling.

Run: ``python benchmarks/data_throughput.py [--images 8000] [--points 200000] [--batches 40]``; prints markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from lit_gen.data.datamodule import ShardDataModule
from lit_gen.data.info import read_info
from lit_gen.data.shards import write_shards
from lit_gen.data.stream import Collate, decode_npy

BATCH = 256


def make_images(n: int, out: Path) -> Path:
    """n smooth random 32x32 RGB images (bilinear-upsampled 4x4 noise plus mild noise: PNG sizes like CIFAR's)."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    fine = fine + torch.from_numpy(rng.normal(0, 8, (n, 3, 32, 32)).astype(np.float32))
    images = fine.clamp(0, 255).round().to(torch.uint8).numpy()
    np.savez(out / "images.npz", x=images, y=rng.integers(0, 10, n))
    return out / "images.npz"


def plain_pipeline(shards: Path, kind: str) -> wds.DataPipeline:
    """The plain webdataset pipeline with the same decode and collation."""
    info = read_info(shards)
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    if kind == "image":
        image = wds.imagehandler("torchrgb8")
        decode = wds.map_dict(png=lambda data: image("png", data))
        key = "png"
    else:
        decode = wds.map_dict(npy=lambda data: torch.from_numpy(decode_npy(data).copy()))
        key = "npy"
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=0, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(1000, 1000, rng=random.Random(0)),
        decode,
        wds.map(lambda s: (s[key], int(s.get("cls", 0)))),
        wds.batched(BATCH, collation_fn=Collate(info), partial=False),
    )


def rate(iterable, batches: int, repeats: int) -> float:
    """Median samples/s over ``repeats`` timed runs of ``batches`` batches (after one warm-up batch each)."""
    it = iter(iterable)
    results = []
    for _ in range(repeats):
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        results.append(batches * BATCH / (time.perf_counter() - start))
    return statistics.median(results)


def endless(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = [
            ("32x32 RGB PNG", "image", str(make_images(args.images, tmp)), 1000),
            ("2-D points (.npy)", "points", f"builtin:toy2d:gmm8:{args.points}", 25000),
        ]
        for name, kind, source, shard_size in sets:
            shards = tmp / kind
            write_shards(source, shards, shard_size=shard_size)
            plain = rate(plain_pipeline(shards, kind), args.batches, args.repeats)
            ours = {}
            for workers in (0, 2):
                dm = ShardDataModule(str(shards), batch_size=BATCH, num_workers=workers, shuffle_buffer=1000)
                loader = dm.train_dataloader()
                ours[workers] = rate(endless(loader), args.batches * (1 + workers), args.repeats)
                loader.close()
            rows.append((name, plain, ours[0], ours[0] / plain, ours[2]))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| data | plain webdataset, samples/s | lit_gen stream, samples/s | ratio | lit_gen, 2 workers, samples/s |")
    print("|---|---:|---:|---:|---:|")
    for name, plain, ours0, ratio, ours2 in rows:
        print(f"| {name} | {plain:,.0f} | {ours0:,.0f} | {ratio:.2f}x | {ours2:,.0f} |")


if __name__ == "__main__":
    main()
