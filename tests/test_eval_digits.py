"""The digits feature network: accuracy, safetensors cache, determinism; FD / IS / precision-recall on digits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_gen.data.shards import write_shards
from lit_gen.errors import LitGenError
from lit_gen.eval import Evaluator, feature_network, frechet_distance
from lit_gen.eval import digits_classifier as dc


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``LIT_GEN_CACHE`` pointed at a fresh folder for this module (the classifier is trained once, here)."""
    cache = tmp_path_factory.mktemp("lit_gen_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIT_GEN_CACHE", str(cache))
        dc.load_digits_classifier()
        yield cache


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits"
    write_shards("builtin:digits", out, shard_size=1000)
    return out


def test_split_is_fixed_and_stratified() -> None:
    train_x, train_y, test_x, test_y = dc.digits_split()
    assert (len(train_x), len(test_x)) == (1437, 360)
    again = dc.digits_split()
    assert (again[0] == train_x).all() and (again[3] == test_y).all()
    assert torch.bincount(torch.from_numpy(test_y)).min() >= 34  # every class in the test split (~36 each)
    assert train_x.dtype.name == "uint8" and train_x.shape[1:] == (1, 8, 8) and train_x.max() == 255


def test_classifier_reaches_97_percent_is_cached_and_deterministic(digits_cache: Path, monkeypatch) -> None:
    path = digits_cache / dc.CACHE_NAME
    assert path.is_file()
    cached = {k: v.clone() for k, v in load_file(str(path)).items()}  # clone: the file is memory-mapped
    _, _, test_x, test_y = dc.digits_split()

    def no_training(**kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached classifier should have been used")

    with monkeypatch.context() as mp:
        mp.setattr(dc, "train_digits_classifier", no_training)
        model = dc.load_digits_classifier()
    assert dc.accuracy(model, test_x, test_y) >= dc.MIN_TEST_ACCURACY
    assert dc.accuracy(model, test_x.astype("float32"), test_y) >= dc.MIN_TEST_ACCURACY  # sampler output: floats
    # A damaged cache file is retrained — to bit-identical weights (seeded, deterministic).
    path.write_bytes(b"garbage")
    retrained = dc.load_digits_classifier()
    for name, tensor in retrained.state_dict().items():
        assert torch.equal(tensor, cached[name]), name
    assert load_file(str(path)).keys() == cached.keys()


def test_digits_fd_separates_real_from_damaged_digits(digits_cache: Path) -> None:
    train_x, _, test_x, _ = dc.digits_split()
    net = feature_network("digits", {"kind": "image", "shape": [1, 8, 8]})
    train, test = torch.from_numpy(train_x), torch.from_numpy(test_x)
    assert frechet_distance(test, test, feature=net) == pytest.approx(0.0, abs=1e-6)
    real = frechet_distance(test, train, feature=net)
    noisy = (train.float() + 60 * torch.randn(train.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    shifted = torch.roll(train, shifts=2, dims=3)
    fd_noisy = frechet_distance(test, noisy, feature=net)
    fd_shifted = frechet_distance(test, shifted, feature=net)
    assert real < 0.2 * fd_noisy and real < 0.2 * fd_shifted
    assert frechet_distance(test, noisy.round().to(torch.uint8), feature=net) == pytest.approx(fd_noisy, rel=0.05)


def test_evaluator_scores_digits_samples(digits_cache: Path, digits_shards: Path) -> None:
    evaluator = Evaluator(digits_shards, ["fd", "pr", "is", "fd_raw"])
    assert evaluator.default_n() == 1797
    train_x, _, _, _ = dc.digits_split()
    real = evaluator.score(torch.from_numpy(train_x).float())  # samples come as 0..255 floats
    assert set(real) == {"fd", "precision", "recall", "is", "fd_raw"}
    assert real["is"] > 8.0  # confident and balanced over 10 classes: close to 10
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    blank = evaluator.score(torch.full((500, 1, 8, 8), 20.0))
    assert blank["is"] < 2.0 and blank["fd"] > 10 * real["fd"] and blank["recall"] < 0.05
    with pytest.raises(LitGenError, match="built-in 2-D mixture"):
        Evaluator(digits_shards, ["mixture"])
    with pytest.raises(LitGenError, match="unknown metric 'kid'"):
        Evaluator(digits_shards, ["kid"])
    nan = evaluator.score(torch.full((8, 1, 8, 8), float("nan")))
    assert all(v != v for v in nan.values())  # a diverged model scores NaN, no exception
