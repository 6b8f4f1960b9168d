"""ShardDataModule: shard resolution, batches, exact round trips, determinism, workers, Lightning epochs, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_gen.data.datamodule import ShardDataModule, resolve_shards
from lit_gen.data.info import denormalize, to_uint8
from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """30 random RGB NHWC uint8 images with labels 0..2, in 3 shards."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=30)
    np.savez(root / "src.npz", images=images, labels=labels)
    write_shards(str(root / "src.npz"), root / "shards", shard_size=10)
    return root / "shards", images.transpose(0, 3, 1, 2), labels


@pytest.fixture(scope="module")
def point_data(tmp_path_factory):
    """2000 toy points in 4 shards."""
    root = tmp_path_factory.mktemp("points")
    write_shards("builtin:toy2d:gmm8:2000", root, shard_size=500, seed=0)
    return root


def rows(images: np.ndarray, labels) -> list[tuple[bytes, int]]:
    return sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True))


def test_images_round_trip_exactly(image_data):
    folder, images, labels = image_data
    dm = ShardDataModule(str(folder), batch_size=8, val_shards=str(folder), val_batch_size=7)
    assert dm.info["kind"] == "image" and dm.info["shape"] == [3, 5, 4] and dm.info["num_classes"] == 3
    batches = list(dm.val_dataloader())
    assert [len(b["label"]) for b in batches] == [7, 7, 7, 7, 2]
    for b in batches:
        assert set(b) == {"x", "label"}
        assert b["x"].dtype == torch.float32 and b["x"].shape[1:] == (3, 5, 4)
        assert b["label"].dtype == torch.int64
        assert b["x"].min() >= -1 and b["x"].max() <= 1
    x = torch.cat([b["x"] for b in batches])
    got = to_uint8(x, dm.info).numpy()
    assert rows(got, torch.cat([b["label"] for b in batches])) == rows(images, labels)
    # denormalize alone lands exactly on the integers
    np.testing.assert_array_equal(denormalize(x, dm.info).numpy(), got.astype(np.float32))


def test_training_batches(image_data):
    folder, images, labels = image_data
    dm = ShardDataModule(str(folder), batch_size=8, shuffle_buffer=16)
    assert dm.val_dataloader is None  # no validation loader without val_shards
    loader = dm.train_dataloader()
    assert dm.num_batches_per_epoch() == 30 // 8 == len(loader)
    known = dict(rows(images, labels))
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"x", "label"} and b["x"].shape == (8, 3, 5, 4) and b["label"].shape == (8,)
        for img, lab in zip(to_uint8(b["x"], dm.info).numpy(), b["label"].tolist(), strict=True):
            assert known[img.tobytes()] == lab
    assert len(list(loader)) == 3  # the next epoch is as long


def test_points_round_trip(point_data):
    dm = ShardDataModule(str(point_data), batch_size=64, val_shards=str(point_data), val_batch_size=512)
    batches = list(dm.val_dataloader())
    x = torch.cat([b["x"] for b in batches])
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.zeros(2000, dtype=torch.int64))
    assert abs(x.std().item() - 0.5) < 1e-3 and x.mean(0).abs().max() < 1e-3
    from lit_gen.data.builtin import TOY2D

    expected, _ = TOY2D["gmm8"].sample(2000, seed=0)
    got = denormalize(x, dm.info).numpy()
    order = np.lexsort(got.T)
    np.testing.assert_allclose(got[order], expected[np.lexsort(expected.T)], atol=1e-5)
    train = next(iter(dm.train_dataloader()))
    assert train["x"].shape == (64, 2) and train["label"].shape == (64,)


def test_points_with_labels(tmp_path):
    points = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    labels = np.arange(40) % 5
    np.savez(tmp_path / "p.npz", x=points, y=labels)
    write_shards(str(tmp_path / "p.npz"), tmp_path / "s")
    dm = ShardDataModule(str(tmp_path / "s"), batch_size=10, val_shards=str(tmp_path / "s"))
    b = next(iter(dm.val_dataloader()))
    raw = denormalize(b["x"], dm.info).numpy()
    for p, lab in zip(raw, b["label"].tolist(), strict=True):
        i = int(np.argmin(np.abs(points - p).sum(1)))
        np.testing.assert_allclose(p, points[i], atol=1e-5)
        assert lab == labels[i]


def test_same_seed_same_stream(point_data):
    def first(seed, n=3):
        it = iter(ShardDataModule(str(point_data), batch_size=32, seed=seed, shuffle_buffer=100).train_dataloader())
        return [next(it)["x"] for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    unshuffled = ShardDataModule(str(point_data), batch_size=32, seed=0, shuffle_buffer=0).train_dataloader()
    assert not torch.equal(a[0], next(iter(unshuffled))["x"])  # the shuffle buffer is in the pipeline


def test_ranks_draw_different_streams(tmp_path, monkeypatch):
    write_shards("builtin:toy2d:gmm8:400", tmp_path, shard_size=1000)  # one shard for two ranks

    def first_batch(rank):
        dm = ShardDataModule(str(tmp_path), batch_size=20)
        monkeypatch.setattr(dm, "_rank_world", lambda: (rank, 2))
        assert dm.num_batches_per_epoch() == 400 // (20 * 2)
        return next(iter(dm.train_dataloader()))["x"]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_epochs_differ_and_default_length(point_data):
    dm = ShardDataModule(str(point_data), batch_size=100)
    loader = dm.train_dataloader()
    assert len(loader) == 2000 // 100
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(epoch2) == 20
    assert not torch.equal(epoch1[0]["x"], epoch2[0]["x"])
    assert ShardDataModule(str(point_data), batch_size=5000).num_batches_per_epoch() == 1


def test_workers(point_data):
    dm = ShardDataModule(str(point_data), batch_size=50, num_workers=2, steps_per_epoch=5, val_shards=str(point_data))
    loader = dm.train_dataloader()
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(epoch2) == 5
    assert all(b["x"].shape == (50, 2) for b in epoch1 + epoch2)
    # the stream continues across epochs: the second epoch draws new data
    assert not torch.equal(epoch1[0]["x"], epoch2[0]["x"])
    # the two workers draw different streams
    assert not torch.equal(epoch1[0]["x"], epoch1[1]["x"])
    val = torch.cat([b["x"] for b in dm.val_dataloader()])
    assert val.shape == (2000, 2)


def test_lightning_fit_epoch_length(point_data, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.train_steps = 0
            self.val_samples = 0

        def training_step(self, batch, batch_idx):
            self.train_steps += 1
            return self.lin(batch["x"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.val_samples += len(batch["x"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for val_shards, val_expected in [(None, 0), (str(point_data), 2 * 2000)]:
        module = Probe()
        dm = ShardDataModule(
            str(point_data), batch_size=64, steps_per_epoch=4, val_shards=val_shards, val_batch_size=500
        )
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm)
        assert module.train_steps == 8
        assert module.val_samples == val_expected


def test_unconditional_image_folder(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((4, 4), 60 * k, np.uint8)).save(tmp_path / f"{k}.png")
    write_shards(str(tmp_path), tmp_path / "s")
    dm = ShardDataModule(str(tmp_path / "s"), batch_size=3, val_shards=str(tmp_path / "s"))
    b = next(iter(dm.val_dataloader()))
    assert b["x"].shape == (3, 1, 4, 4)
    assert b["label"].tolist() == [0, 0, 0]
    assert sorted(to_uint8(b["x"], dm.info)[:, 0, 0, 0].tolist()) == [0, 60, 120]


def test_shard_specs(point_data):
    from_folder = resolve_shards(str(point_data))
    assert [Path(u).name for u in from_folder] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert resolve_shards(str(point_data / "*.tar")) == from_folder
    assert resolve_shards(str(point_data / "shard-{000000..000003}.tar")) == from_folder
    assert resolve_shards(str(point_data / "shard-{000001..000002}.tar")) == from_folder[1:3]
    assert resolve_shards("https://example.com/d/shard-{0..2}.tar") == [
        f"https://example.com/d/shard-{i}.tar" for i in range(3)
    ]
    dm = ShardDataModule(str(point_data / "shard-{000000..000001}.tar"), batch_size=10)
    assert dm.urls == from_folder[:2] and dm.info["num_samples"] == 2000


def test_errors_surface_in_the_constructor(tmp_path, point_data):
    missing = tmp_path / "missing"
    with pytest.raises(LitGenError, match=f"{missing} does not exist"):
        ShardDataModule(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LitGenError, match=f"no \\*.tar shards in {empty}"):
        ShardDataModule(str(empty))
    with pytest.raises(LitGenError, match="no shards match"):
        ShardDataModule(str(empty / "*.tar"))
    with pytest.raises(LitGenError, match="shard-000004.tar does not exist"):
        ShardDataModule(str(point_data / "shard-{000000..000009}.tar"))
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "shard-000000.tar").write_bytes((point_data / "shard-000000.tar").read_bytes())
    with pytest.raises(LitGenError, match=str(lone / "dataset.json")):
        ShardDataModule(str(lone))
    assert ShardDataModule(str(lone), info_file=str(point_data / "dataset.json")).info["kind"] == "points"
    with pytest.raises(LitGenError, match="info_file"):
        ShardDataModule("https://example.com/data/shard-{000000..000003}.tar")
    with pytest.raises(LitGenError, match=f"{missing} does not exist"):
        ShardDataModule(str(point_data), val_shards=str(missing))
    with pytest.raises(LitGenError, match="batch sizes"):
        ShardDataModule(str(point_data), batch_size=0)


def test_validation_shards_must_match(tmp_path, point_data):
    write_shards("builtin:digits", tmp_path / "digits", shard_size=2000)
    with pytest.raises(LitGenError, match="validation shards"):
        ShardDataModule(str(point_data), val_shards=str(tmp_path / "digits"))
