"""The training stream: exact resume (direct and through `lit-gen fit --ckpt_path`), exact epochs, bad data, mixing."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_gen.data.datamodule import DataWarning, ShardDataModule
from lit_gen.data.info import to_uint8
from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError
from tests.conftest import REPO, run_cli


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> Path:
    """2000 toy points in 8 shards of 250."""
    out = tmp_path_factory.mktemp("points") / "gmm8"
    write_shards("builtin:toy2d:gmm8:2000", out, shard_size=250)
    return out


@pytest.fixture(scope="module")
def folder74(tmp_path_factory) -> tuple[Path, dict[bytes, str]]:
    """74 distinct 8x8 RGB images in 2 class folders -> shards of 20; returns (shards, pixels -> file name)."""
    root = tmp_path_factory.mktemp("folder74")
    rng = np.random.default_rng(0)
    known = {}
    for i in range(74):
        cls = "cat" if i < 40 else "dog"
        (root / "src" / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "src" / cls / f"{i:03d}.png")
        known[pixels.transpose(2, 0, 1).tobytes()] = f"{cls}/{i:03d}"
    run_cli("shards", root / "src", "--out", root / "shards", "--shard-size", 20, "--no-progress")
    return root / "shards", known


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    """n batches from a loader, across as many epochs as needed (stops mid-epoch like a max_steps stop)."""
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(u["x"], v["x"]) and torch.equal(u["label"], v["label"]) for u, v in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("segment", [2**20, 100])  # 100: several stream segments (module docstring) are crossed
def test_resume_continues_the_exact_stream(points, workers, segment, monkeypatch):
    monkeypatch.setattr("lit_gen.data.stream.SEGMENT", segment)

    def dm():
        return ShardDataModule(str(points), batch_size=32, num_workers=workers, steps_per_epoch=5, shuffle_buffer=64)

    reference = take(dm().train_dataloader(), 16)
    assert len({b["x"].sum().item() for b in reference}) == 16  # the stream does not repeat itself
    for k in (7, 10):  # mid-epoch and on an epoch boundary; k = 7 is odd, so worker slots are re-mapped
        first = dm()
        assert same(take(first.train_dataloader(), k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))  # plain data only
        assert state["train_stream"]["delivered"] == k
        resumed = dm()
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
        head = list(loader)  # the rest of the interrupted epoch, then whole epochs again
        assert len(head) == 5 - k % 5
        assert same(head + take(loader, 16 - k - len(head)), reference[k:])


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_the_global_rng_alone(points, workers):
    """Training noise comes from the global RNG; opening and reading the stream (epochs included) must not draw from
    it (torch draws each DataLoader iterator's worker base seed from the loader's own generator here)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    dm = ShardDataModule(str(points), batch_size=32, num_workers=workers, steps_per_epoch=3, shuffle_buffer=64)
    assert len(take(dm.train_dataloader(), 7)) == 7  # three iterators opened
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("resampled", [True, False])
def test_decoded_sample_cache_gives_the_same_batches_and_is_bounded(folder74, resampled):
    """PNG shards: cached and uncached streams agree batch for batch over several passes (epochs); the cache fills
    up to its budget and no further, and a later pass reads cached shards without decoding."""
    shards, _ = folder74

    def batches(cache_mb: float) -> tuple[list[dict], ShardDataModule]:
        kwargs = {"steps_per_epoch": 6} if resampled else {"resampled": False}
        dm = ShardDataModule(str(shards), batch_size=8, shuffle_buffer=16, cache_mb=cache_mb, **kwargs)
        return take(dm.train_dataloader(), 24), dm

    plain, _ = batches(0)
    cached, dm = batches(1)
    assert same(plain, cached)
    stream = dm._train_loader.stream
    assert len(stream._cache) == 4 and 0 < stream._cached_bytes <= 2**20  # all 4 shards (74 images of 8x8x3)
    tiny, dm = batches(10000 / 2**20)  # room for one shard (20 images x (192 + 256) bytes), not two
    assert same(plain, tiny) and 0 < len(dm._train_loader.stream._cache) < 4


def test_changed_world_size_warns_and_starts_a_fresh_stream(points, monkeypatch):
    first = ShardDataModule(str(points), batch_size=32, steps_per_epoch=5)
    seen = take(first.train_dataloader(), 3)
    state = first.state_dict()
    resumed = ShardDataModule(str(points), batch_size=32, steps_per_epoch=5)
    monkeypatch.setattr(resumed, "_rank_world", lambda: (0, 2))
    resumed.load_state_dict(state)
    with pytest.warns(DataWarning, match="world_size 1 -> 2.*fresh stream"):
        loader = resumed.train_dataloader()
    nxt = take(loader, 2)
    assert len(nxt) == 2 and not any(torch.equal(nxt[0]["x"], b["x"]) for b in seen)
    assert resumed.data_stats()["batches"] == 5  # counters carry over


class _BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.digests: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.digests.append(hashlib.sha1(batch["x"].numpy().tobytes() + batch["label"].numpy().tobytes()).hexdigest())


class BatchRecorder(_BatchRecorder):
    """Appends a digest of every training batch to ``path`` (used through `lit-gen fit --trainer.callbacks+=`)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {self.digests[-1]}\n")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_lit_gen_fit_resume_sees_the_uninterrupted_batches(toy_shards, tmp_path, workers):
    """The toy2d teacher recipe, 19 batches per epoch: stop at step 23 (mid-epoch 2), resume with --ckpt_path last."""

    def fit(root: Path, steps: int, log: Path, *extra: object) -> None:
        run_cli(
            "fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--data.init_args.shards", toy_shards,
            "--data.init_args.num_workers", workers, "--data.init_args.shuffle_buffer", 2000,
            "--trainer.default_root_dir", root, "--trainer.max_steps", steps, "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=tests.test_data_stream.BatchRecorder",
            "--trainer.callbacks.path", log, *extra,
        )  # fmt: skip

    def read(log: Path) -> list[tuple[int, str]]:
        return [(int(s), d) for s, d in (line.split() for line in log.read_text().splitlines())]

    fit(tmp_path / "full", 30, tmp_path / "full.log")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        warnings.filterwarnings("error", message=".*dataloader is not resumable")  # Lightning's warning
        fit(tmp_path / "cut", 23, tmp_path / "cut.log")
        fit(tmp_path / "cut", 30, tmp_path / "cut.log", "--ckpt_path", "last")
    full, cut = read(tmp_path / "full.log"), read(tmp_path / "cut.log")
    assert [s for s, _ in cut] == list(range(30)) == [s for s, _ in full]
    assert cut == full
    ckpt = torch.load(tmp_path / "cut/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["ShardDataModule"]["train_stream"]["delivered"] == 30
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["delivered"] == 30


def test_resume_survives_a_rebuilt_loader(points):
    """Lightning #20550: a loop that rebuilds its loader on resume drops the loader's own state; the DataModule's
    copy still restores the position."""
    reference = take(ShardDataModule(str(points), batch_size=50, steps_per_epoch=4).train_dataloader(), 6)
    first = ShardDataModule(str(points), batch_size=50, steps_per_epoch=4)
    take(first.train_dataloader(), 3)
    resumed = ShardDataModule(str(points), batch_size=50, steps_per_epoch=4)
    resumed.load_state_dict(first.state_dict())
    resumed.train_dataloader()  # built early (e.g. for estimated_stepping_batches) and thrown away
    assert same(take(resumed.train_dataloader(), 3), reference[3:])


# ---------------------------------------------------------------------------------------------------- exact epochs
def test_folder_of_74_images_in_exact_epochs(folder74):
    shards, known = folder74
    info = json.loads((shards / "dataset.json").read_text())
    assert info["num_samples"] == 74 and len(info["shards"]) >= 4 and info["shard_sizes"] == [20, 20, 20, 14]
    assert info["class_names"] == ["cat", "dog"]
    for workers in (0, 2):
        dm = ShardDataModule(str(shards), batch_size=8, num_workers=workers, resampled=False, shuffle_buffer=10)
        loader = dm.train_dataloader()
        for _ in range(2):  # two epochs, each every image exactly once
            batches = list(loader)
            assert len(batches) == len(loader)
            x = torch.cat([b["x"] for b in batches])
            labels = torch.cat([b["label"] for b in batches]).tolist()
            names = [known[img.tobytes()] for img in to_uint8(x, dm.info).numpy()]
            assert sorted(names) == sorted(known.values())
            assert all(("dog" in n) == bool(lab) for n, lab in zip(names, labels, strict=True))


def test_exact_epochs_need_enough_shards(folder74, monkeypatch):
    shards, _ = folder74
    dm = ShardDataModule(str(shards), batch_size=8, num_workers=3, resampled=False)
    monkeypatch.setattr(dm, "_rank_world", lambda: (0, 2))
    with pytest.raises(LitGenError, match="2 x 3, but there are only 4 shard"):
        dm.train_dataloader()
    with pytest.raises(LitGenError, match="steps_per_epoch applies"):
        ShardDataModule(str(shards), resampled=False, steps_per_epoch=3)


def test_exact_epoch_resume(folder74):
    shards, _ = folder74

    def dm():
        return ShardDataModule(str(shards), batch_size=8, num_workers=2, resampled=False, shuffle_buffer=10)

    reference = take(dm().train_dataloader(), 15)
    first = dm()
    take(first.train_dataloader(), 6)
    resumed = dm()
    resumed.load_state_dict(first.state_dict())
    assert same(take(resumed.train_dataloader(), 9), reference[6:])


# -------------------------------------------------------------------------------------------------------- bad data
def _corrupt(src: Path, dst: Path) -> None:
    """Copy of the 8 point shards with shard 2 truncated mid-sample and 3 samples of shard 5 made undecodable."""
    dst.mkdir()
    (dst / "dataset.json").write_text((src / "dataset.json").read_text())
    for tar in sorted(src.glob("*.tar")):
        data = tar.read_bytes()
        if tar.name == "shard-000002.tar":
            data = data[: len(data) // 3 + 100]
        if tar.name == "shard-000005.tar":
            out = io.BytesIO()
            with tarfile.open(fileobj=io.BytesIO(data)) as tin, tarfile.open(fileobj=out, mode="w") as tout:
                for i, member in enumerate(tin.getmembers()):
                    payload = tin.extractfile(member).read()
                    if i in (0, 4):
                        payload = b"garbage"  # bad .npy bytes
                    if i == 8:
                        member.name = member.name.replace(".npy", ".txt")  # missing key
                    member.size = len(payload)
                    tout.addfile(member, io.BytesIO(payload))
            data = out.getvalue()
        (dst / tar.name).write_bytes(data)


def test_bad_shards_and_samples_are_skipped_and_counted(points, tmp_path):
    bad = tmp_path / "bad"
    _corrupt(points, bad)
    dm = ShardDataModule(str(bad), batch_size=50, resampled=False, shuffle_buffer=0, max_skipped_fraction=0.5)
    with pytest.warns(DataWarning) as caught:
        batches = list(dm.train_dataloader())
    messages = " ".join(str(w.message) for w in caught)
    assert "shard-000002.tar" in messages and "shard-000005.tar" in messages
    unique = {tuple(row) for b in batches for row in b["x"].tolist()}
    stats = dm.data_stats()
    assert stats["skipped"] > 3  # 3 bad samples plus the truncated shard's lost samples (sizes from dataset.json)
    assert len(unique) == 2000 - stats["skipped"]  # all the others are delivered once
    assert len(batches) == len(dm.train_dataloader())  # the short epoch repeats its last batch to keep its length


def test_skipped_fraction_ceiling_stops_the_run(points, tmp_path):
    bad = tmp_path / "bad"
    _corrupt(points, bad)
    dm = ShardDataModule(str(bad), batch_size=50, resampled=False, shuffle_buffer=0, max_skipped_fraction=0.01)
    with pytest.warns(DataWarning), pytest.raises(LitGenError, match="samples .* are damaged .*more than max_skipped"):
        list(dm.train_dataloader())


class _Probe(L.LightningModule):
    """A one-layer model that counts its training steps (the data path is what is under test)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.lin(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm: ShardDataModule, tmp_path: Path, steps: int) -> _Probe:
    model = _Probe()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return model


def _truncate(tar: Path, keep: float) -> None:
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * keep)])


def test_one_truncated_shard_of_six_is_counted_once_and_the_fit_completes(tmp_path):
    """Issue 20: 6 shards of 10k points, one cut to half. The resampled stream meets the broken shard again and
    again (``skipped`` grows each time), but its loss counts once against the data set: ~5000 of 60000 (8.3%) is
    under the default ceiling, so the fit runs all 50 steps and ends with one summary line."""
    shards = tmp_path / "six"
    write_shards("builtin:toy2d:gmm8:60000", shards, shard_size=10_000)
    _truncate(shards / "shard-000003.tar", 0.5)
    dm = ShardDataModule(str(shards), batch_size=1024, shuffle_buffer=0, steps_per_epoch=10)
    with pytest.warns(DataWarning) as caught:
        model = _fit(dm, tmp_path, 50)
    assert model.steps == 50
    stats = dm.data_stats()
    assert 4900 <= stats["damaged"] <= 5100  # the shard's lost half, once
    assert stats["skipped"] > stats["damaged"]  # it was drawn more than once (the old ceiling counted every draw)
    summary = [str(w.message) for w in caught if str(w.message).startswith("data: ")]
    assert len(summary) == 1 and "shard-000003.tar" in summary[0] and "of the data set" in summary[0]
    # the same damage is judged against a stricter ceiling: one line, not a traceback
    strict = ShardDataModule(
        str(shards), batch_size=1024, shuffle_buffer=0, steps_per_epoch=10, max_skipped_fraction=0.05
    )
    with pytest.warns(DataWarning), pytest.raises(LitGenError, match=r"of the data set's 60000 samples \(8\.\d%\)"):
        take(strict.train_dataloader(), 50)


def test_one_truncated_shard_of_a_hundred_read_first_does_not_stop_the_run(tmp_path):
    """The shard the stream draws first is broken (3/4 of it lost): judged on the first 1000 samples read, as the
    old ceiling did, that is ~13% skipped; judged on the data set it is 0.75%, and the run goes on."""
    import random

    from lit_gen.data.stream import seed_of

    shards = tmp_path / "hundred"
    write_shards("builtin:toy2d:gmm8:20000", shards, shard_size=200)
    first = random.Random(seed_of(0, 0, 0, 0, 1, 0)).randrange(100)  # rank 0, slot 0, source 0, segment 0
    _truncate(shards / f"shard-{first:06d}.tar", 0.25)
    dm = ShardDataModule(str(shards), batch_size=250, shuffle_buffer=0, steps_per_epoch=8)
    with pytest.warns(DataWarning, match=f"shard-{first:06d}.tar"):
        batches = take(dm.train_dataloader(), 8)
    assert len(batches) == 8
    stats = dm.data_stats()
    assert 140 <= stats["damaged"] <= 160 and stats["skipped"] >= stats["damaged"]


@pytest.mark.parametrize("workers", [0, 1])
def test_every_sample_unreadable_stops_before_the_first_step(points, tmp_path, workers):
    """A data set that cannot be read at all (here: dataset.json says shape [3], the samples hold 2 numbers) is not
    damage to count but a setup error: one line, before any training step."""
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    info = json.loads((points / "dataset.json").read_text())
    info["shape"] = [3]
    (wrong / "dataset.json").write_text(json.dumps(info))
    for tar in points.glob("*.tar"):
        (wrong / tar.name).write_bytes(tar.read_bytes())
    dm = ShardDataModule(str(wrong), batch_size=64, num_workers=workers, max_skipped_fraction=1.0)
    model = _Probe()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    warnings.simplefilter("ignore", DataWarning)
    with pytest.raises(LitGenError, match=r"none of the first 64 samples \(from \d+ shards\) could be decoded") as err:
        trainer.fit(model, datamodule=dm)
    assert "\n" not in str(err.value) and model.steps == 0


def test_damage_found_survives_a_resume(points, tmp_path):
    """The damage found is part of the stream state: a resumed run does not forget (nor double) it."""
    bad = tmp_path / "bad"
    _corrupt(points, bad)
    warnings.simplefilter("ignore", DataWarning)

    def dm():
        return ShardDataModule(str(bad), batch_size=40, steps_per_epoch=6, shuffle_buffer=30, max_skipped_fraction=1)

    reference = dm()
    take(reference.train_dataloader(), 60)
    first = dm()
    take(first.train_dataloader(), 25)
    assert 0 < first.data_stats()["damaged"] < reference.data_stats()["damaged"]
    resumed = dm()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    take(resumed.train_dataloader(), 35)
    assert resumed.data_stats() == reference.data_stats() and reference.data_stats()["damaged"] > 3


@pytest.mark.parametrize("cache_mb", [0, 64])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_bad_samples(points, tmp_path, workers, cache_mb, monkeypatch):
    monkeypatch.setattr("lit_gen.data.stream.SEGMENT", 150)
    bad = tmp_path / "bad"
    _corrupt(points, bad)
    warnings.simplefilter("ignore", DataWarning)

    def dm(cache=cache_mb):
        return ShardDataModule(
            str(bad), batch_size=40, num_workers=workers, steps_per_epoch=6, shuffle_buffer=30, max_skipped_fraction=1,
            cache_mb=cache,
        )  # fmt: skip

    if cache_mb:  # the decoded-sample cache changes nothing: same batches, same skip counts
        uncached_dm = dm(0)
        uncached = take(uncached_dm.train_dataloader(), 24)
    reference_dm = dm()
    reference = take(reference_dm.train_dataloader(), 24)
    assert reference_dm.data_stats()["skipped"] > 0
    first = dm()
    take(first.train_dataloader(), 11)
    resumed = dm()
    resumed.load_state_dict(first.state_dict())
    assert same(take(resumed.train_dataloader(), 13), reference[11:])
    assert resumed.data_stats() == reference_dm.data_stats()
    if cache_mb:
        assert same(reference, uncached) and reference_dm.data_stats() == uncached_dm.data_stats()


def test_every_shard_failing_is_one_error(tmp_path, points):
    bad = tmp_path / "allbad"
    bad.mkdir()
    (bad / "dataset.json").write_text((points / "dataset.json").read_text())
    (bad / "shard-000000.tar").write_bytes(b"not a tar at all" * 10)
    dm = ShardDataModule(str(bad), batch_size=10, num_workers=1)  # the error crosses the worker boundary
    with pytest.raises(LitGenError, match="shards in a row gave no samples .*shard-000000.tar"):
        next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------------------------------------- mixing
def test_weighted_mixing_of_labelled_and_unlabelled_sources(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(600, 2)).astype(np.float32) + 10, y=np.arange(600) % 3)
    np.save(tmp_path / "b.npy", rng.normal(size=(600, 2)).astype(np.float32) - 10)
    write_shards(str(tmp_path / "a.npz"), tmp_path / "a", shard_size=100)
    write_shards(str(tmp_path / "b.npy"), tmp_path / "b", shard_size=100)
    spec = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    with pytest.warns(DataWarning, match="own normalisation"):
        dm = ShardDataModule(spec, batch_size=100, weights=[0.7, 0.3], steps_per_epoch=20, shuffle_buffer=50)
    assert dm.info["num_classes"] == 3 and dm.info["num_samples"] == 1200
    batches = list(dm.train_dataloader())
    labels = torch.cat([b["label"] for b in batches])
    from_b = labels == 3  # unlabelled samples get the null class
    assert abs(from_b.float().mean().item() - 0.3) < 0.05
    raw = torch.cat([b["x"] for b in batches]) * dm.info["normalize"]["scale"] + torch.tensor(
        dm.info["normalize"]["shift"]
    )
    assert bool((raw[from_b, 0] < 0).all()) and bool((raw[~from_b, 0] > 0).all())
    with pytest.raises(LitGenError, match="2 weights for 1 shard sources"):
        ShardDataModule(str(tmp_path / "a"), weights=[1.0, 2.0])
    with pytest.raises(LitGenError, match="need resampled=True"):
        ShardDataModule(spec, weights=[1.0, 2.0], resampled=False)


# ------------------------------------------------------------------------------------------------ val-fraction
def test_val_fraction_split_and_parent_folder(tmp_path):
    run_cli("shards", "builtin:digits", "--out", tmp_path / "d", "--val-fraction", "0.1", "--shard-size", 500,
            "--workers", 2, "--no-progress")  # fmt: skip
    train = json.loads((tmp_path / "d/train/dataset.json").read_text())
    val = json.loads((tmp_path / "d/val/dataset.json").read_text())
    assert train["num_samples"] + val["num_samples"] == 1797 and val["num_samples"] == 180
    assert train["normalize"] == val["normalize"] and sum(train["shard_sizes"]) == train["num_samples"]
    dm = ShardDataModule(str(tmp_path / "d"), batch_size=64)
    assert dm.info["num_samples"] == train["num_samples"] and dm.urls[0].startswith(str(tmp_path / "d/train"))
    assert sum(len(b["label"]) for b in dm.val_dataloader()) == 180
    only_train = ShardDataModule(str(tmp_path / "d/train"), batch_size=64)
    assert only_train.val_dataloader is None
    # parallel encoding writes the same bytes as one process
    run_cli("shards", "builtin:digits", "--out", tmp_path / "e", "--val-fraction", "0.1", "--shard-size", 500,
            "--no-progress")  # fmt: skip
    for split in ("train", "val"):
        for a in sorted((tmp_path / "d" / split).iterdir()):
            assert a.read_bytes() == (tmp_path / "e" / split / a.name).read_bytes() or a.name == "dataset.json"


def test_skipped_samples_are_logged(points, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    bad = tmp_path / "bad"
    _corrupt(points, bad)

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            assert set(batch) == {"x", "label"}  # the bookkeeping never reaches the model
            return self.lin(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = ShardDataModule(str(bad), batch_size=100, resampled=False, shuffle_buffer=0, max_skipped_fraction=0.5)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="log"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(DataWarning):
        trainer.fit(Probe(), datamodule=dm)
    lines = (tmp_path / "log/version_0/metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("data/skipped")
    logged = [float(v.split(",")[column]) for v in lines[1:] if v.split(",")[column]]
    assert logged == sorted(logged) and logged[-1] > 0 and logged[-1] <= dm.data_stats()["skipped"]
