"""write_shards: every source kind, the stored format, byte-identical reruns, dataset.json, normalisation, errors."""

import io
import json
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_gen.data import info as info_mod
from lit_gen.data import shards as shards_mod
from lit_gen.data.builtin import TOY2D, load_digits
from lit_gen.data.info import denormalize, normalize, read_info, to_uint8
from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards listed in dataset.json: {key: {ext: bytes}} (checks there are no duplicates)."""
    info = json.loads((folder / "dataset.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name in info["shards"]:
        with tarfile.open(folder / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                entry = samples.setdefault(key, {})
                assert ext not in entry
                entry[ext] = tar.extractfile(member).read()
    return samples


def png_pixels(data: bytes) -> tuple[str, np.ndarray]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    pixels = np.asarray(image)
    return image.mode, (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_toy2d_points(tmp_path):
    info = write_shards("builtin:toy2d:gmm8:2500", tmp_path, shard_size=1000, seed=5, command="lit-gen shards x")
    assert info == json.loads((tmp_path / "dataset.json").read_text())
    assert info["format"] == 1 and info["kind"] == "points" and info["shape"] == [2]
    assert info["num_samples"] == 2500 and info["num_classes"] == 0 and info["class_names"] == []
    assert info["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == info["shards"]
    assert info["source"] == "builtin:toy2d:gmm8:2500" and info["command"] == "lit-gen shards x"

    samples = read_samples(tmp_path)
    assert sorted(samples) == [f"{i:06d}" for i in range(2500)]
    assert all(set(s) == {"npy"} for s in samples.values())  # unconditional: no cls
    expected, _ = TOY2D["gmm8"].sample(2500, seed=5)
    got = np.stack([npy(samples[f"{i:06d}"]["npy"]) for i in range(2500)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # written in a shuffled order: the first shard is not simply the first 1000 rows
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        first_keys = [m.name.split(".")[0] for m in tar.getmembers()]
    assert len(first_keys) == 1000 and first_keys != [f"{i:06d}" for i in range(1000)]

    norm = info["normalize"]
    np.testing.assert_allclose(norm["shift"], expected.astype(np.float64).mean(0), rtol=1e-6)
    x = normalize(expected, info)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    assert abs(x.std() - 0.5) < 1e-4


def test_default_toy2d_size_and_seed(tmp_path, monkeypatch):
    assert shards_mod.TOY2D_DEFAULT_SIZE == 100_000
    monkeypatch.setattr(shards_mod, "TOY2D_DEFAULT_SIZE", 300)  # writing 100k points takes seconds
    info = write_shards("builtin:toy2d:grid9", tmp_path / "a", shard_size=200)
    assert info["num_samples"] == 300 and len(info["shards"]) == 2
    other = write_shards("builtin:toy2d:grid9:10", tmp_path / "b", seed=1)
    same = write_shards("builtin:toy2d:grid9:10", tmp_path / "c", seed=1)
    diff = write_shards("builtin:toy2d:grid9:10", tmp_path / "d", seed=2)
    assert other["normalize"] == same["normalize"] != diff["normalize"]


def test_rerun_is_byte_identical(tmp_path, monkeypatch):
    import webdataset.writer

    def write(out, seed=0, clock=0.0):
        # a different wall clock per run: tar headers must not depend on it
        monkeypatch.setattr(webdataset.writer, "time", types.SimpleNamespace(time=lambda: clock))
        write_shards("builtin:digits", out, shard_size=700, seed=seed)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first = write(tmp_path / "a", clock=1.0e9)
    second = write(tmp_path / "b", clock=1.7e9)
    assert list(first) == ["dataset.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert first == second
    assert write(tmp_path / "c", seed=1)["shard-000000.tar"] != first["shard-000000.tar"]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "lit_gen", "lit_gen")}


def test_digits(tmp_path):
    info = write_shards("builtin:digits", tmp_path, shard_size=1000)
    assert info["kind"] == "image" and info["shape"] == [1, 8, 8] and info["num_samples"] == 1797
    assert info["num_classes"] == 10 and info["class_names"] == [str(k) for k in range(10)]
    assert info["normalize"] == {"shift": 127.5, "scale": 127.5}
    images, labels = load_digits()
    samples = read_samples(tmp_path)
    assert len(samples) == 1797
    for i in (0, 1, 500, 1796):
        s = samples[f"{i:06d}"]
        assert set(s) == {"png", "cls"}
        mode, pixels = png_pixels(s["png"])
        assert mode == "L"
        np.testing.assert_array_equal(pixels, images[i])
        assert int(s["cls"].decode()) == labels[i]


def test_resize_digits(tmp_path):
    info = write_shards("builtin:digits", tmp_path, image_size=16)
    assert info["shape"] == [1, 16, 16]
    mode, pixels = png_pixels(read_samples(tmp_path)["000000"]["png"])
    assert pixels.shape == (1, 16, 16)


def test_npy_nhwc_uint8_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    info = write_shards(str(tmp_path / "imgs.npy"), tmp_path / "out", shard_size=4)
    assert info["shape"] == [3, 5, 6] and info["num_classes"] == 0 and len(info["shards"]) == 3
    samples = read_samples(tmp_path / "out")
    for i in range(10):
        assert set(samples[f"{i:06d}"]) == {"png"}
        mode, pixels = png_pixels(samples[f"{i:06d}"]["png"])
        assert mode == "RGB"
        np.testing.assert_array_equal(pixels, images[i].transpose(2, 0, 1))


@pytest.mark.parametrize(
    ("layout", "value_range"), [("nchw", "01"), ("nhwc", "pm1"), ("nhw", "01"), ("nchw", "uint16")]
)
def test_npy_layouts_and_value_ranges(tmp_path, layout, value_range):
    u8 = np.random.default_rng(1).integers(0, 256, size=(6, 3, 4, 5), dtype=np.uint8)
    u8[0, 0, 0, 0], u8[0, 0, 0, 1] = 0, 255
    if layout == "nhw":
        u8 = u8[:, :1]
    if value_range == "01":
        data = u8 / 255.0
    elif value_range == "pm1":
        data = (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    else:
        data = u8.astype(np.uint16)
    if layout == "nhwc":
        data = data.transpose(0, 2, 3, 1)
    elif layout == "nhw":
        data = data[:, 0]
    np.save(tmp_path / "a.npy", data)
    info = write_shards(str(tmp_path / "a.npy"), tmp_path / "out")
    assert info["shape"] == list(u8.shape[1:])
    samples = read_samples(tmp_path / "out")
    for i in range(6):
        np.testing.assert_array_equal(png_pixels(samples[f"{i:06d}"]["png"])[1], u8[i])


def test_npz_points_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.0]
    labels = rng.integers(0, 4, size=50)
    labels[0] = 3
    np.savez(tmp_path / "p.npz", points=points, labels=labels)
    info = write_shards(str(tmp_path / "p.npz"), tmp_path / "out")
    assert info["kind"] == "points" and info["shape"] == [3]
    assert info["num_classes"] == 4 and info["class_names"] == ["0", "1", "2", "3"]
    samples = read_samples(tmp_path / "out")
    for i in range(50):
        s = samples[f"{i:06d}"]
        np.testing.assert_allclose(npy(s["npy"]), points[i], rtol=1e-6)
        assert int(s["cls"]) == labels[i]
    centred = points - points.mean(0)
    np.testing.assert_allclose(info["normalize"]["shift"], points.mean(0), rtol=1e-5)
    np.testing.assert_allclose(info["normalize"]["scale"], 2 * np.sqrt((centred**2).mean()), rtol=1e-5)


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    cat = [rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8) for _ in range(3)]
    dog_gray = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
    for k, img in enumerate(cat):
        save_png(src / "cat" / f"{k}.png", img)
    save_png(src / "dog" / "a.png", dog_gray)  # grayscale among RGB -> stored as RGB
    (src / "notes.txt").write_text("ignored")
    (src / "empty").mkdir()  # a sub-folder without images is not a class
    info = write_shards(str(src), tmp_path / "out")
    assert info["shape"] == [3, 6, 6] and info["num_samples"] == 4
    assert info["class_names"] == ["cat", "dog"] and info["num_classes"] == 2
    samples = read_samples(tmp_path / "out")
    for k in range(3):  # sorted file order: cat/0, cat/1, cat/2, dog/a
        mode, pixels = png_pixels(samples[f"{k:06d}"]["png"])
        assert mode == "RGB" and samples[f"{k:06d}"]["cls"] == b"0"
        np.testing.assert_array_equal(pixels, cat[k].transpose(2, 0, 1))
    mode, pixels = png_pixels(samples["000003"]["png"])
    assert samples["000003"]["cls"] == b"1"
    np.testing.assert_array_equal(pixels, np.repeat(dog_gray[None], 3, axis=0))


def test_image_folder_gray_unconditional_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    save_png(src / "a.png", rng.integers(0, 256, size=(8, 12), dtype=np.uint8))
    save_png(src / "b.png", rng.integers(0, 256, size=(10, 10), dtype=np.uint8))
    with pytest.raises(LitGenError, match="differ in size"):
        write_shards(str(src), tmp_path / "out")
    info = write_shards(str(src), tmp_path / "out", image_size=4)
    assert info["shape"] == [1, 4, 4] and info["num_classes"] == 0 and info["class_names"] == []
    samples = read_samples(tmp_path / "out")
    assert all(set(s) == {"png"} for s in samples.values())
    assert all(png_pixels(s["png"])[1].shape == (1, 4, 4) for s in samples.values())
    # an image already at the target size is stored unchanged
    square = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
    save_png(tmp_path / "sq" / "x.png", square)
    write_shards(str(tmp_path / "sq"), tmp_path / "out2", image_size=4)
    np.testing.assert_array_equal(png_pixels(read_samples(tmp_path / "out2")["000000"]["png"])[1][0], square)


def test_stale_shards_are_replaced(tmp_path):
    write_shards("builtin:toy2d:gmm8:30", tmp_path, shard_size=10)
    info = write_shards("builtin:toy2d:gmm8:30", tmp_path, shard_size=20)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == info["shards"] == ["shard-000000.tar", "shard-000001.tar"]


def test_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LitGenError, match=str(missing)):
        write_shards(str(missing), tmp_path / "out")
    with pytest.raises(LitGenError, match="unknown built-in.*gmm8"):
        write_shards("builtin:toy2d:nosuch", tmp_path / "out")
    with pytest.raises(LitGenError, match="unknown built-in"):
        write_shards("builtin:mnist", tmp_path / "out")
    with pytest.raises(LitGenError, match="positive integer"):
        write_shards("builtin:toy2d:gmm8:many", tmp_path / "out")
    for shape in [(7,), (4, 5, 5, 5), (2, 2, 2, 2, 2)]:
        bad = tmp_path / f"bad{len(shape)}.npy"
        np.save(bad, np.zeros(shape, dtype=np.float32))
        with pytest.raises(LitGenError, match=str(bad)):
            write_shards(str(bad), tmp_path / "out")
    out_of_range = tmp_path / "range.npy"
    np.save(out_of_range, np.full((2, 3, 4, 4), 2.0, dtype=np.float32))
    with pytest.raises(LitGenError, match=rf"{out_of_range}.*\[0, 1\] or \[-1, 1\]"):
        write_shards(str(out_of_range), tmp_path / "out")
    npz = tmp_path / "keys.npz"
    np.savez(npz, data=np.zeros((3, 2)))
    with pytest.raises(LitGenError, match=rf"{npz}.*'x', 'images' or 'points'"):
        write_shards(str(npz), tmp_path / "out")
    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, x=np.zeros((3, 2)), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(LitGenError, match="labels"):
        write_shards(str(bad_labels), tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LitGenError, match=f"{empty} holds no images"):
        write_shards(str(empty), tmp_path / "out")
    corrupt = tmp_path / "corrupt"
    save_png(corrupt / "cls" / "good.png", np.zeros((4, 4), np.uint8))
    (corrupt / "cls" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(LitGenError, match="broken.png"):
        write_shards(str(corrupt), tmp_path / "out")
    with pytest.raises(LitGenError, match="image-size applies to images"):
        write_shards("builtin:toy2d:gmm8:10", tmp_path / "out", image_size=8)
    assert not (tmp_path / "out").exists()  # every problem is found before anything is written


def test_read_info_errors(tmp_path):
    with pytest.raises(LitGenError, match=str(tmp_path / "dataset.json")):
        read_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(LitGenError, match="not valid JSON"):
        read_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": 1, "kind": "image"}))
    with pytest.raises(LitGenError, match="lacks the key"):
        read_info(tmp_path / "dataset.json")
    write_shards("builtin:toy2d:gmm8:10", tmp_path)
    assert read_info(tmp_path)["num_samples"] == 10


def test_normalize_roundtrip_numpy_and_torch():
    image_info = {"kind": "image", "normalize": {"shift": 127.5, "scale": 127.5}}
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = normalize(pixels, image_info)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x, image_info), pixels)
    xt = normalize(torch.from_numpy(pixels), image_info)
    assert xt.dtype == torch.float32 and torch.equal(to_uint8(xt, image_info), torch.from_numpy(pixels))
    np.testing.assert_allclose(denormalize(xt, image_info).numpy(), pixels.astype(np.float32))
    assert torch.equal(to_uint8(torch.tensor([-1.5, 1.5]), image_info), torch.tensor([0, 255], dtype=torch.uint8))

    point_info = {"kind": "points", "normalize": {"shift": [1.0, -2.0], "scale": 4.0}}
    pts = np.array([[1.0, -2.0], [5.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(normalize(pts, point_info), [[0.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(denormalize(normalize(pts, point_info), point_info), pts)
    pt = torch.from_numpy(pts)
    assert torch.allclose(denormalize(normalize(pt, point_info), point_info), pt)
    assert normalize(pt, point_info).dtype == torch.float32
    assert info_mod.normalize(pts.astype(np.float64), point_info).dtype == np.float64
