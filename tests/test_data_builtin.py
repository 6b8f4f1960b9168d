"""Built-in data: toy 2-D mixtures (sampling, assignment, mode metrics) and scikit-learn digits."""

import math

import numpy as np
import pytest

from lit_gen.data.builtin import TOY2D, Mixture2D, load_digits, mixture_metrics


def test_toy2d_table_has_the_promised_mixtures():
    assert {"gmm8", "grid9", "gmm5_heldout"} <= set(TOY2D)
    for name, mix in TOY2D.items():
        assert math.isclose(sum(mix.weights), 1.0, abs_tol=1e-9), name
        assert len(mix.means) == len(mix.stds) == len(mix.weights) == mix.num_modes
        assert len(set(mix.weights)) > 1, f"{name} must have unequal weights"
    gmm8 = TOY2D["gmm8"]
    assert gmm8.num_modes == 8
    np.testing.assert_allclose(np.linalg.norm(np.asarray(gmm8.means), axis=1), 4.0)
    assert set(gmm8.stds) == {0.15}
    np.testing.assert_allclose(sorted(gmm8.weights), np.arange(1, 9) / 36)
    grid9 = TOY2D["grid9"]
    assert sorted({c for m in grid9.means for c in m}) == [-3.0, 0.0, 3.0]
    assert grid9.num_modes == 9 and set(grid9.stds) == {0.2}
    held = TOY2D["gmm5_heldout"]
    assert held.num_modes == 5 and min(held.stds) >= 0.1 and max(held.stds) <= 0.3 and len(set(held.stds)) > 1
    with pytest.raises(ValueError):
        Mixture2D(means=((0.0, 0.0),), stds=(1.0,), weights=(0.5,))


def test_sample_is_deterministic_and_follows_weights():
    mix = TOY2D["gmm8"]
    a, ma = mix.sample(20000, seed=3)
    b, mb = mix.sample(20000, seed=3)
    c, _ = mix.sample(20000, seed=4)
    assert a.shape == (20000, 2) and a.dtype == np.float32 and ma.shape == (20000,) and ma.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)
    freq = np.bincount(ma, minlength=8) / len(ma)
    np.testing.assert_allclose(freq, mix.weights, atol=0.01)
    # points sit around the mean of the mode they came from, with the mode's std
    resid = a - np.asarray(mix.means)[ma]
    assert abs(resid.std() - 0.15) < 0.005


@pytest.mark.parametrize("name", sorted(TOY2D))
def test_true_samples_score_perfectly(name):
    mix = TOY2D[name]
    points, modes = mix.sample(20000, seed=0)
    labels = mix.assign(points)
    on = labels >= 0
    # within 3 sigma of a 2-D isotropic Gaussian: 1 - exp(-4.5) = 98.9 %
    assert abs(on.mean() - (1 - math.exp(-4.5))) < 0.005
    assert (labels[on] == modes[on]).all()
    m = mixture_metrics(points, mix)
    assert m["num_modes"] == mix.num_modes
    assert m["modes_covered"] == mix.num_modes
    assert m["mode_tv"] < 0.02
    assert m["off_mode"] < 0.02


def test_assign_nearest_mode_within_k_sigma():
    mix = TOY2D["gmm5_heldout"]
    means = np.asarray(mix.means)
    np.testing.assert_array_equal(mix.assign(means), np.arange(5))
    # mode 1 has std 0.1: 2.5 sigma away is on-mode, 3.5 sigma away is off-mode (and far from every other mode)
    near = means[1] + np.array([0.25, 0.0])
    far = means[1] + np.array([0.35, 0.0])
    np.testing.assert_array_equal(mix.assign(np.stack([near, far])), [1, -1])
    assert mix.assign(far[None], k_sigma=4.0)[0] == 1
    assert mix.assign(np.array([[50.0, 50.0]]))[0] == -1


def test_metrics_detect_a_dropped_mode_and_wrong_weights():
    mix = TOY2D["gmm8"]
    points, modes = mix.sample(20000, seed=1)
    dropped = points[modes != 7]  # mode 7 is the heaviest (weight 8/36)
    m = mixture_metrics(dropped, mix)
    assert m["modes_covered"] == 7
    assert m["mode_tv"] > 0.15
    assert m["off_mode"] < 0.02
    # a mode counts as covered from max(5, 1 % of its expected count) points: here 1 % of 20000 * 8/36 = 44
    heaviest = points[modes == 7]
    assert mixture_metrics(np.concatenate([dropped, heaviest[:30]]), mix)["modes_covered"] == 7
    assert mixture_metrics(np.concatenate([dropped, heaviest[:60]]), mix)["modes_covered"] == 8
    assert mixture_metrics(heaviest[:4], mix)["modes_covered"] == 0  # 4 < 5 even where 1 % is less
    assert mixture_metrics(heaviest[:5], mix)["modes_covered"] == 1
    # equal weights instead of 1..8: every mode covered, but tv shows it
    uniform = Mixture2D(mix.means, mix.stds, (1 / 8,) * 8).sample(20000, seed=2)[0]
    m = mixture_metrics(uniform, mix)
    assert m["modes_covered"] == 8
    expected_tv = 0.5 * sum(abs(1 / 8 - w) for w in mix.weights)
    assert abs(m["mode_tv"] - expected_tv) < 0.02


def test_metrics_detect_off_mode_noise():
    mix = TOY2D["grid9"]
    points, _ = mix.sample(7000, seed=0)
    rng = np.random.default_rng(0)
    noise = rng.uniform(-5, 5, size=(3000, 2)).astype(np.float32)
    noise_on = (mix.assign(noise) >= 0).mean()  # the modes cover a small part of the box
    m = mixture_metrics(np.concatenate([points, noise]), mix)
    assert abs(m["off_mode"] - (0.3 * (1 - noise_on) + 0.7 * 0.011)) < 0.02
    assert m["off_mode"] > 0.25
    assert m["modes_covered"] == 9
    all_off = mixture_metrics(np.full((100, 2), 40.0), mix)
    assert all_off["off_mode"] == 1.0 and all_off["modes_covered"] == 0 and all_off["mode_tv"] == 1.0


def test_log_prob_is_a_normalised_density():
    mix = TOY2D["gmm5_heldout"]
    step = 0.02
    grid = np.arange(-6, 6, step) + step / 2
    xx, yy = np.meshgrid(grid, grid)
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    total = np.exp(mix.log_prob(pts)).sum() * step * step
    assert abs(total - 1.0) < 1e-3
    # at a mode's centre the density is dominated by that mode: w / (2 pi s^2)
    lp = mix.log_prob(np.asarray(mix.means[1])[None])[0]
    assert abs(lp - math.log(0.25 / (2 * math.pi * 0.1**2))) < 1e-6
    # more probable points have higher log_prob
    assert mix.log_prob(np.array([[20.0, 20.0]]))[0] < lp - 100


def test_load_digits():
    from sklearn.datasets import load_digits as sk_digits

    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    assert set(labels.tolist()) == set(range(10))
    raw = sk_digits().images
    np.testing.assert_array_equal(images[:, 0], np.rint(raw * 255 / 16).astype(np.uint8))
    assert (images[:, 0][raw == 16] == 255).all() and (images[:, 0][raw == 8] == 128).all()
