"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function profiles, least-squares reconstruction, snapshots that
survive a stop-and-resume bit-exactly, ``lit-gen phema``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from callbacks.phema import PostHocEMA, update_profiles
from lit_gen.errors import LitGenError
from lit_gen.phema import (
    gamma_from_sigma_rel,
    power_beta,
    read_snapshots,
    reconstruct,
    sigma_rel_from_gamma,
    solve_coefficients,
    write_snapshot,
)
from tests.conftest import REPO, run_cli


def test_sigma_rel_and_gamma() -> None:
    # EDM2 Sec. 3.1: σ_rel 0.05 ↔ γ ≈ 16.97, σ_rel 0.10 ↔ γ ≈ 6.94
    assert gamma_from_sigma_rel(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_sigma_rel(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.28):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(s)) == pytest.approx(s, rel=1e-10)
    assert power_beta(1, 6.94) == 0.0  # the first update copies
    for bad in (0.0, 0.3, -1.0):
        with pytest.raises(LitGenError, match="sigma_rel must be in"):
            gamma_from_sigma_rel(bad)


def _track(steps: int, every: int, sigma_rels: list[float], folder: Path | None, seed: int = 0) -> dict:
    """A random-walk 'network' of 64 numbers (+ an integer buffer) trained for ``steps`` steps, EMAs tracked with
    ``update_profiles``, snapshots every ``every`` steps; returns the final profiles."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(64, dtype=torch.float64)
    profiles = None
    for t in range(1, steps + 1):
        theta += torch.randn(64, generator=gen, dtype=torch.float64) * 0.1 + 0.01 * torch.sin(theta)
        current = {"w": theta.float(), "count": torch.tensor([t], dtype=torch.long)}
        if profiles is None:
            profiles = {repr(s): {k: v.clone().float() if v.is_floating_point() else v.clone()
                                  for k, v in current.items()} for s in sigma_rels}  # fmt: skip
        update_profiles(profiles, current, t)
        if folder is not None and t % every == 0:
            write_snapshot(folder, t, {float(k): v for k, v in profiles.items()}, {})
    return profiles


def test_power_ema_matches_its_profile_and_reconstruction_reproduces_a_tracked_one(tmp_path: Path) -> None:
    profiles = _track(400, 40, [0.05, 0.10], tmp_path)
    snapshots = read_snapshots(tmp_path)
    assert [m["step"] for m, _ in snapshots] == list(range(40, 401, 40))
    for s in (0.05, 0.10):
        weights, x = reconstruct(snapshots, s)
        assert x.sum() == pytest.approx(1.0, abs=1e-12)
        assert float((weights["w"] - profiles[repr(s)]["w"]).abs().max()) <= 1e-6
        assert torch.equal(weights["count"], torch.tensor([400]))
    # weights sum to 1 for any target, also before the final normalisation nearly (profiles are densities)
    x = solve_coefficients([100, 200, 100, 200], [16.97, 16.97, 6.94, 6.94], 200, gamma_from_sigma_rel(0.07))
    assert x.sum() == pytest.approx(1.0, abs=1e-12)


def test_reconstruction_of_an_untracked_width_is_close_to_tracking_it(tmp_path: Path) -> None:
    profiles = _track(400, 20, [0.05, 0.10], tmp_path)
    direct = _track(400, 20, [0.07], None)
    weights, _ = reconstruct(read_snapshots(tmp_path), 0.07)
    err = float((weights["w"] - direct[repr(0.07)]["w"]).abs().max())
    spread = float((profiles[repr(0.05)]["w"] - profiles[repr(0.10)]["w"]).abs().max())  # how far the profiles differ
    assert err < 0.01 * spread, (err, spread)  # measured: 2.4e-4 vs a spread of 0.69


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(LitGenError, match="no post-hoc EMA snapshots"):
        read_snapshots(tmp_path)
    with pytest.raises(LitGenError, match="sigma_rel must be in"):
        PostHocEMA(sigma_rels=[0.5])
    with pytest.raises(LitGenError, match="snapshot_every_n_steps"):
        PostHocEMA(snapshot_every_n_steps=0)
    (tmp_path / "phema-00000010.safetensors").write_bytes(b"garbage")
    with pytest.raises(LitGenError, match="cannot read the post-hoc EMA snapshot"):
        read_snapshots(tmp_path)


@pytest.mark.slow
def test_snapshots_survive_stop_and_resume_bit_exactly_and_lit_gen_phema(toy_shards: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load((REPO / "recipes/toy2d/teacher.yaml").read_text())
    recipe["trainer"]["callbacks"].append(
        {
            "class_path": "callbacks.phema.PostHocEMA",
            "init_args": {"sigma_rels": [0.05, 0.10], "snapshot_every_n_steps": 20},
        }
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def fit(root: Path, steps: int, *extra: str) -> None:
        run_cli(
            "fit", "-c", path, "--data.init_args.shards", toy_shards, "--trainer.default_root_dir", root,
            "--trainer.max_steps", steps, "--model.init_args.decay_steps", 60, "--model.init_args.warmup_steps", 10,
            "--trainer.enable_progress_bar",
            "false", *extra,
        )  # fmt: skip

    fit(tmp_path / "straight", 60)
    fit(tmp_path / "resumed", 40)
    first = {step: tmp_path / "resumed" / "phema" / f"phema-{step:08d}.safetensors" for step in (20, 40)}
    kept = {step: load_file(str(f)) for step, f in first.items()}
    for f in first.values():
        f.unlink()  # a resumed run starts at step 40: it must not write them again (a fresh start would)
    fit(tmp_path / "resumed", 60, "--ckpt_path", "last")
    assert not any(f.exists() for f in first.values())
    for step, tensors in kept.items():
        save_file(tensors, str(first[step]))
    for step in (20, 40, 60):
        a = load_file(str(tmp_path / "straight" / "phema" / f"phema-{step:08d}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "phema" / f"phema-{step:08d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    out = tmp_path / "phema_out"
    run_cli("phema", tmp_path / "straight", "--sigma-rel", "0.05", "0.08", "--out", out)
    from lit_gen.export import load_model

    tracked = load_file(str(tmp_path / "straight" / "phema" / "phema-00000060.safetensors"))
    model = load_model(out / "phema-0.050.safetensors")
    for k, v in model.net.state_dict().items():
        np.testing.assert_allclose(v.numpy(), tracked[f"0/{k}"].numpy(), atol=1e-6)
    assert model.description["phema"]["sigma_rel"] == 0.05
    assert load_model(out / "phema-0.080.safetensors").sample(16, steps=2).shape == (16, 2)
