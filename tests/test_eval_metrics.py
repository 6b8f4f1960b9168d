"""Evaluation metrics on tensors: Fréchet distance (raw, digits and Inception features), precision/recall, the
mixture lookup, and the Inception weights contract (local file only, never unpickled code)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch

from lit_gen.data.builtin import TOY2D
from lit_gen.errors import LitGenError
from lit_gen.eval import PrecisionRecall, feature_network, frechet_distance, inception_weights_path, mixture_of
from lit_gen.eval.features import INCEPTION_ENV, INCEPTION_FILE, RawFeatures


def _gauss(n: int, dim: int, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_fd_of_a_set_with_itself_is_zero_and_a_shift_adds_its_squared_length() -> None:
    x = _gauss(4000, 2, 1.0, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean moved by d: FD = ‖d‖² exactly (the trace terms cancel).
    previous = 0.0
    for shift in (0.1, 0.5, 2.0):
        d = torch.tensor([shift, -shift])
        fd = frechet_distance(x, x + d)
        assert fd == pytest.approx(float(d.pow(2).sum()), rel=1e-6)
        assert fd > previous
        previous = fd


def test_fd_matches_the_gaussian_closed_form() -> None:
    # N(0, a²I) vs N(0, b²I) in D dims: FD = D (a - b)². Sampling error at n = 20000 is well under 5 %.
    a, b, dim = 1.0, 2.0, 3
    fd = frechet_distance(_gauss(20000, dim, a, 1), _gauss(20000, dim, b, 2))
    assert fd == pytest.approx(dim * (a - b) ** 2, rel=0.05)
    # Two samples of the same distribution: only the finite-sample bias remains.
    assert frechet_distance(_gauss(20000, dim, a, 1), _gauss(20000, dim, a, 3)) < 0.01


def test_raw_features_flatten_images() -> None:
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    out = RawFeatures([1, 8, 8])(images)
    assert out.shape == (5, 64) and out.dtype == torch.float64
    assert torch.equal(out[0], images[0].flatten().double())


def test_precision_recall_separate_quality_from_coverage() -> None:
    mixture = TOY2D["gmm8"]
    real = torch.from_numpy(mixture.sample(2000, seed=0)[0])
    same = torch.from_numpy(mixture.sample(2000, seed=1)[0])
    pr = PrecisionRecall(RawFeatures([2]), k=3)
    pr.set_reference(real)
    good = pr(same)
    assert good["precision"] > 0.9 and good["recall"] > 0.9
    # All samples on one mode: still precise, but most of the real data is not covered.
    points, modes = mixture.sample(4000, seed=2)
    collapsed = pr(torch.from_numpy(points[modes == 7][:2000]))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.4
    # Samples off the data: neither.
    off = pr(_gauss(2000, 2, 0.2, 4).float())  # the circle of modes has radius 4: the centre is empty
    assert off["precision"] < 0.05


def test_mixture_of_reads_the_dataset_source() -> None:
    assert mixture_of({"source": "builtin:toy2d:gmm8"}) is TOY2D["gmm8"]
    assert mixture_of({"source": "builtin:toy2d:gmm5_heldout:20000"}) is TOY2D["gmm5_heldout"]
    assert mixture_of({"source": "builtin:digits"}) is None
    assert mixture_of({"source": "points.npy"}) is None
    assert mixture_of({}) is None


# --------------------------------------------------------------------------------------------- Inception weights
IMAGES = {"kind": "image", "shape": [3, 16, 16]}


def test_inception_weights_missing_says_which_file_and_where(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("LIT_GEN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LitGenError) as err:
        inception_weights_path()
    message = str(err.value)
    assert "\n" not in message and INCEPTION_FILE in message and str(tmp_path / "cache") in message
    assert INCEPTION_ENV in message and "--inception-weights" in message
    with pytest.raises(LitGenError, match=INCEPTION_FILE):
        feature_network("inception", IMAGES)  # the FID metric fails the same way
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(LitGenError, match="nowhere.pth do not exist"):
        inception_weights_path()
    # Found in the cache folder under its usual name.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / INCEPTION_FILE).write_bytes(b"")
    monkeypatch.delenv(INCEPTION_ENV)
    assert inception_weights_path() == tmp_path / "cache" / INCEPTION_FILE


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this must never run",))


def test_inception_weights_are_never_unpickled_as_code(tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.pth"
    for write in (lambda: torch.save({"fc.weight": _Evil()}, evil), lambda: evil.write_bytes(pickle.dumps(_Evil()))):
        write()
        with pytest.raises(LitGenError, match="refusing to load .*evil.pth"):
            feature_network("inception", IMAGES, inception_weights=evil)
    assert "this must never run" not in capsys.readouterr().out
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(LitGenError, match="junk.pth"):
        feature_network("inception", IMAGES, inception_weights=junk)
    tensors_only = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], tensors_only)
    with pytest.raises(LitGenError, match="not a state dict"):
        feature_network("inception", IMAGES, inception_weights=tensors_only)


def test_feature_networks_refuse_data_they_do_not_fit() -> None:
    with pytest.raises(LitGenError, match="points"):
        feature_network("digits", {"kind": "points", "shape": [2]})
    with pytest.raises(LitGenError, match="1x8x8"):
        feature_network("digits", IMAGES)
    with pytest.raises(LitGenError, match="unknown feature network"):
        feature_network("vgg", IMAGES)


def _random_inception_weights(path: Path, monkeypatch) -> None:
    """A state dict of the FID Inception architecture with random weights (the real file cannot be downloaded here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    monkeypatch.setattr(fx, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_fid_path_runs_through_torchmetrics_inception(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("torch_fidelity")
    weights = tmp_path / INCEPTION_FILE
    _random_inception_weights(weights, monkeypatch)
    monkeypatch.setenv(INCEPTION_ENV, str(weights))
    info = {"kind": "image", "shape": [1, 8, 8]}
    net = feature_network("inception", info)
    assert net.num_features == 2048
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=gen)
    features = net(a.float())  # float pixels are rounded to uint8, gray repeated to RGB
    assert features.shape == (6, 2048) and torch.isfinite(features).all()
    assert torch.equal(features, net(a))
    fd_self = frechet_distance(a, a, feature=net)
    fd_other = frechet_distance(a, torch.full_like(a, 255) - a // 4, feature=net)
    assert math.isfinite(fd_other) and abs(fd_self) < 1e-3 * fd_other
    # A state dict of another network is refused with one line.
    other = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(LitGenError, match="not the FID Inception-v3 weights"):
        feature_network("inception", info, inception_weights=other)
