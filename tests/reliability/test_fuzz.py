"""Property-based fuzzing (hypothesis) of `lit-gen shards` inputs, the shard reader and the checkpoint readers
(issue 9, item 8).

Whatever the input — random arrays of any dtype and shape (empty axes, NaN, huge values), folders with empty
sub-folders, junk files and broken images, shards with truncated, flipped or replaced bytes — the outcome is either
a result that is right or a one-line `LitGenError`; never another exception, never a hang (each example runs under
an alarm).
"""

from __future__ import annotations

import io
import shutil
import signal
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from lit_gen.cli import check_resume_checkpoint, main
from lit_gen.data.datamodule import ShardDataModule
from lit_gen.data.info import read_info
from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError
from lit_gen.export import read_checkpoint
from tests.conftest import fit_toy_teacher

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def fire(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"no result within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def shards_or_error(source: Path, out: Path, **kwargs: object) -> dict | None:
    """write_shards, accepting only success or a LitGenError (whose message is one line)."""
    try:
        with alarm(60):
            return write_shards(str(source), out, **kwargs)
    except LitGenError as err:
        assert "\n" not in str(err) and str(err), repr(err)
        event("refused with a LitGenError")
        return None


def read_back(out: Path, batches: int = 2, workers: int = 0, **kwargs: object) -> list[dict[str, torch.Tensor]]:
    dm = ShardDataModule(str(out), batch_size=4, num_workers=workers, steps_per_epoch=batches, **kwargs)
    with alarm(60):
        return list(dm.train_dataloader())


# ------------------------------------------------------------------------------------------ lit-gen shards inputs
DTYPES = st.sampled_from(["uint8", "int16", "int64", "float16", "float32", "float64", "bool", "uint16"])
SHAPES = hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=5)


@FUZZ
@given(
    data=st.one_of(
        hnp.arrays(DTYPES, SHAPES),
        hnp.arrays("float32", SHAPES, elements=st.floats(-1, 1, width=32)),  # mostly valid images / points
        hnp.arrays("uint8", hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=5)),
    ),
    labels=st.one_of(st.none(), hnp.arrays(st.sampled_from(["int64", "int8", "float32"]), SHAPES)),
    npz=st.booleans(),
    shard_size=st.integers(1, 4),
    val_fraction=st.sampled_from([0.0, 0.3]),
)
def test_lit_gen_shards_takes_any_array_or_says_why(data, labels, npz, shard_size, val_fraction) -> None:
    with workdir() as tmp:
        source = tmp / ("a.npz" if npz else "a.npy")
        if npz:
            np.savez(source, x=data, **({} if labels is None else {"y": labels}))
        else:
            np.save(source, data)
        info = shards_or_error(source, tmp / "out", shard_size=shard_size, val_fraction=val_fraction)
        if info is None:
            return
        event("accepted")
        # Accepted: the shards hold every sample, and they read back with the declared shape and finite values.
        out = tmp / "out"
        infos = (
            [read_info(out / "train" / "dataset.json"), read_info(out / "val" / "dataset.json")]
            if (out / "train").is_dir()
            else [read_info(out / "dataset.json")]
        )
        assert sum(int(i["num_samples"]) for i in infos) == data.shape[0]
        batch = read_back(out / "train" if (out / "train").is_dir() else out, batches=1)[0]
        assert list(batch["x"].shape[1:]) == list(info["shape"]) and torch.isfinite(batch["x"]).all()


@st.composite
def folder_trees(draw: st.DrawFn) -> list[tuple[str, str, tuple[int, int]]]:
    """(relative path, kind, size) entries: good images of random sizes/modes, junk bytes named .png, text files,
    empty sub-folders."""
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        folder = draw(st.sampled_from(["", "cat/", "dog/", "dog/deep/", "empty/"]))
        kind = draw(st.sampled_from(["L", "RGB", "RGB", "RGBA", "P", "junk", "text", "dir"]))
        size = draw(st.sampled_from([(4, 4), (4, 4), (4, 4), (1, 9), (6, 3)]))
        ext = draw(st.sampled_from([".png", ".png", ".jpg", ".bmp", ".txt"]))
        entries.append((f"{folder}f{len(entries)}{ext}", kind, size))
    return entries


@FUZZ
@given(tree=folder_trees(), image_size=st.sampled_from([None, 4]))
def test_lit_gen_shards_takes_any_folder_or_says_why(tree, image_size) -> None:
    with workdir() as tmp:
        root = tmp / "src"
        root.mkdir()
        for rel, kind, size in tree:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                path.with_suffix("").mkdir(exist_ok=True)
            elif kind == "junk":
                path.write_bytes(bytes(np.random.default_rng(len(rel)).integers(0, 256, 40, dtype=np.uint8)))
            elif kind == "text":
                path.write_text("not an image")
            else:
                image = Image.new(kind, size, color=7 if kind in ("L", "P") else (7,) * len(kind))
                fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".txt": "PNG"}[path.suffix]
                if fmt == "JPEG" and kind in ("RGBA", "P"):
                    image = image.convert("RGB")
                image.save(path, format=fmt)
        info = shards_or_error(root, tmp / "out", shard_size=2, image_size=image_size)
        if info is None:
            return
        event("accepted")
        assert info["num_samples"] >= 1 and len(info["shape"]) == 3
        batch = read_back(tmp / "out", batches=1)[0]
        assert list(batch["x"].shape[1:]) == info["shape"] and batch["x"].abs().max() <= 1.0 + 1e-6


def test_cli_reports_fuzzed_failures_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI turns what the fuzzers accept as errors into exit code 2 and one line."""
    np.save(tmp_path / "empty_axis.npy", np.zeros((3, 0, 4), dtype=np.float32))
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty_axis.npy", tmp_path / "empty"):
        with pytest.raises(SystemExit) as exit_info:
            main(["shards", str(source), "--out", str(tmp_path / "out"), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lit-gen: error:") and str(source) in err[0]


# ------------------------------------------------------------------------------------------------- shard reader
@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_shards")
    images = np.random.default_rng(0).integers(0, 256, (24, 3, 6, 6), dtype=np.uint8)
    np.savez(root / "images.npz", x=images, y=np.arange(24) % 3)
    write_shards(str(root / "images.npz"), root / "images", shard_size=6)
    write_shards("builtin:toy2d:gmm8:48", root / "points", shard_size=12)
    return {"images": root / "images", "points": root / "points"}


CORRUPTIONS = st.lists(
    st.tuples(
        st.integers(0, 3),  # which shard
        st.sampled_from(["truncate", "flip", "zero", "junk_member", "empty_file", "drop_member"]),
        st.floats(0.0, 1.0),  # where in the file / which member
    ),
    min_size=1,
    max_size=4,
)


def corrupt(path: Path, how: str, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = int(where * (len(data) - 1))
    if how == "truncate":
        path.write_bytes(bytes(data[:at]))
    elif how == "flip":
        for k in range(at, min(at + 64, len(data))):
            data[k] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "zero":
        data[at : at + 512] = bytes(len(data[at : at + 512]))
        path.write_bytes(bytes(data))
    elif how == "empty_file":
        path.write_bytes(b"")
    else:  # rewrite the tar with one member replaced by junk bytes, or left out
        try:
            with tarfile.open(path) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, EOFError, OSError):
            return  # already broken by an earlier corruption
        if not members:
            return
        victim = int(where * (len(members) - 1))
        with tarfile.open(path, "w") as tar:
            for i, (member, payload) in enumerate(members):
                if i == victim and how == "drop_member":
                    continue
                if i == victim:
                    payload = b"\x89PNG junk" if member.name.endswith(".png") else b"\x93NUMPY junk"
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))


@FUZZ
@given(kind=st.sampled_from(["images", "points"]), damage=CORRUPTIONS, tolerant=st.booleans(), workers=st.just(0))
def test_shard_reader_survives_any_corruption_or_says_why(clean_shards, kind, damage, tolerant, workers) -> None:
    with workdir() as tmp:
        shards = tmp / kind
        shutil.copytree(clean_shards[kind], shards)
        tars = sorted(shards.glob("*.tar"))
        for index, how, where in damage:
            corrupt(tars[index % len(tars)], how, where)
        expected = [4, 3, 6, 6] if kind == "images" else [4, 2]
        try:
            batches = read_back(shards, batches=3, workers=workers, max_skipped_fraction=1.0 if tolerant else 0.05)
        except LitGenError as err:
            assert "\n" not in str(err)
            event("refused with a LitGenError")
            return
        event("read")
        assert len(batches) == 3
        for batch in batches:
            assert list(batch["x"].shape) == expected and torch.isfinite(batch["x"]).all()


def test_shard_reader_with_workers_survives_corruption(clean_shards: dict[str, Path], tmp_path: Path) -> None:
    """One heavy case through worker processes (hypothesis examples above run in-process for speed)."""
    shards = tmp_path / "images"
    shutil.copytree(clean_shards["images"], shards)
    tars = sorted(shards.glob("*.tar"))
    corrupt(tars[0], "truncate", 0.5)
    corrupt(tars[1], "junk_member", 0.3)
    batches = read_back(shards, batches=4, workers=2, max_skipped_fraction=1.0)
    assert len(batches) == 4 and all(list(b["x"].shape) == [4, 3, 6, 6] for b in batches)


# ------------------------------------------------------------------------------------------------ checkpoint files
@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory: pytest.TempPathFactory, toy_shards: Path) -> Path:
    root = tmp_path_factory.mktemp("fuzz_ckpt")
    fit_toy_teacher(toy_shards, root, 2)
    return root / "checkpoints" / "last.ckpt"


CKPT_DAMAGE = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "zero", "random", "prefix"]), st.floats(0.0, 1.0), st.binary()),
    min_size=1,
    max_size=3,
)


def damage_bytes(data: bytes, how: str, where: float, junk: bytes) -> bytes:
    at = int(where * max(len(data) - 1, 0))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 64]) + data[at + 64 :]
    if how == "zero":
        return data[:at] + bytes(len(data[at : at + 512])) + data[at + 512 :]
    if how == "prefix":
        return junk + data
    return junk  # the whole file replaced by random bytes


@FUZZ
@given(damage=CKPT_DAMAGE)
def test_checkpoint_readers_survive_any_damage_or_say_why(clean_checkpoint: Path, damage) -> None:
    """`lit-gen sample/export/eval` (read_checkpoint) and `lit-gen fit --ckpt_path` (check_resume_checkpoint) on a
    damaged checkpoint: a complete checkpoint or one LitGenError line naming the file."""
    data = clean_checkpoint.read_bytes()
    for how, where, junk in damage:
        data = damage_bytes(data, how, where, junk)
    with workdir() as tmp, alarm(60):
        path = tmp / "damaged.ckpt"
        path.write_bytes(data)
        for reader in (read_checkpoint, lambda p: check_resume_checkpoint(None, str(p))):
            try:
                checkpoint = reader(path)
            except LitGenError as err:
                assert "\n" not in str(err) and "damaged.ckpt" in str(err)
                event("refused with a LitGenError")
                continue
            event("read")
            if isinstance(checkpoint, dict):  # check_resume_checkpoint returns the accepted path instead
                assert set(checkpoint["state_dict"]) == set(
                    torch.load(clean_checkpoint, weights_only=True)["state_dict"]
                )


def test_fit_resume_from_a_damaged_checkpoint_is_one_line(
    clean_checkpoint: Path, toy_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ckpt_path FILE` and `--ckpt_path last` (the newest last*.ckpt) on damaged files: one line, no training."""
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 8)
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(clean_checkpoint.read_bytes()[:3000])
    for ckpt_path, name in ((garbage, "garbage.ckpt"), ("last", "last.ckpt"), (tmp_path / "nowhere.ckpt", "nowhere")):
        with pytest.raises(SystemExit) as info:
            fit_toy_teacher(toy_shards, root, 4, "--ckpt_path", ckpt_path)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and name in err and err.count("lit-gen: error:") == 1
    assert not (root / "tb").exists() or not list((root / "tb").rglob("events*"))
