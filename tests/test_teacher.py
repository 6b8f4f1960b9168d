"""TeacherDiffusion: the recipe trains, checkpoints describe themselves, samples match the data, export is exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.data.datamodule import ShardDataModule
from lit_gen.diffusion import EDM, VP
from lit_gen.errors import LitGenError
from lit_gen.export import export, load_model, read_checkpoint
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser, UNet
from lit_gen.spec import build
from tests.conftest import fit_toy_teacher, run_cli


def test_label_dropout_uses_the_null_class() -> None:
    net = UNet(
        img_resolution=8,
        in_channels=1,
        model_channels=16,
        channel_mult=(1,),
        num_blocks=1,
        attn_resolutions=(),
        num_classes=10,
    )
    module = TeacherDiffusion(net=net, label_dropout=0.25)
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    dropped = module.labels_for_training(labels)
    null = dropped == 10
    assert 0.23 < null.float().mean() < 0.27
    assert torch.equal(dropped[~null], labels[~null])
    assert TeacherDiffusion(net=net).labels_for_training(labels) is labels  # no dropout: unchanged
    unconditional = TeacherDiffusion(net=MLPDenoiser(dim=2))
    assert unconditional.labels_for_training(labels[:5]) is None


def test_bad_label_dropout_and_unconditional_net_are_refused() -> None:
    with pytest.raises(LitGenError, match="class-conditional"):
        TeacherDiffusion(net=MLPDenoiser(dim=2), label_dropout=0.1)
    with pytest.raises(LitGenError, match="label_dropout"):
        TeacherDiffusion(net=MLPDenoiser(dim=2, num_classes=3), label_dropout=1.5)


def test_data_that_does_not_fit_the_network_is_refused() -> None:
    module = TeacherDiffusion(net=MLPDenoiser(dim=3))
    with pytest.raises(LitGenError, match="cannot take data of shape"):
        module.attach_data({"kind": "points", "shape": [2], "num_classes": 0})
    conditional = TeacherDiffusion(net=MLPDenoiser(dim=2, num_classes=5))
    with pytest.raises(LitGenError, match="num_classes=5"):
        conditional.attach_data({"kind": "points", "shape": [2], "num_classes": 3})
    with pytest.raises(LitGenError, match="no labels"):
        conditional.attach_data({"kind": "points", "shape": [2], "num_classes": 0})


def test_teacher_training_step_is_the_parameterisation_loss(toy_shards: Path) -> None:
    dm = ShardDataModule(str(toy_shards), batch_size=64)
    for param in (EDM(), VP(prediction="v")):
        module = TeacherDiffusion(net=MLPDenoiser(dim=2), param=param)
        module.attach_data(dm.info)
        batch = next(iter(dm.train_dataloader()))
        torch.manual_seed(3)
        loss = module.training_step(batch, 0)
        torch.manual_seed(3)
        expected = param.loss(module.net, batch["x"], None).mean()
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert all(p.grad is not None for p in module.net.parameters())


@pytest.mark.slow
def test_toy_teacher_recipe_trains_and_checkpoint_describes_itself(toy_teacher_run: Path, toy_shards: Path) -> None:
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    checkpoint = read_checkpoint(ckpt)
    section = checkpoint["lit_gen"]
    assert section["method"] == "teacher" and section["has_ema"] and "ema_state_dict" in checkpoint
    assert section["net"]["class_path"] == "lit_gen.nets.mlp.MLPDenoiser"
    assert section["data"]["shape"] == [2] and section["data"]["kind"] == "points"
    assert checkpoint["global_step"] == 600

    # The trained denoiser has a much lower loss than a fresh one (same data, same noise).
    model = load_model(ckpt)
    y = next(iter(ShardDataModule(str(toy_shards), batch_size=4096).train_dataloader()))["x"]
    fresh = build(section["net"])
    losses = []
    for net in (fresh, model.net):
        with torch.no_grad():
            losses.append(float(model.param.loss(net, y, None, generator=torch.Generator().manual_seed(0)).mean()))
    # (EDM's weighted loss is ~1 for a fresh net and has a large irreducible part at high noise levels.)
    assert losses[1] < 0.75 * losses[0], losses

    # Samples (35 NFE Heun) land on the mixture's modes with roughly the right weights, in original units.
    points = model.sample(4096, steps=18, seed=0).numpy()
    assert np.isfinite(points).all()
    metrics = mixture_metrics(points, TOY2D["gmm8"])
    assert metrics["modes_covered"] == 8
    assert metrics["mode_tv"] < 0.15 and metrics["off_mode"] < 0.2, metrics


@pytest.mark.slow
def test_sample_cli_and_export_are_bit_identical(toy_teacher_run: Path, tmp_path: Path) -> None:
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    run_cli("sample", "--ckpt", ckpt, "--n", 2000, "--seed", 7, "--out", tmp_path / "a.npy")
    run_cli("export", "--ckpt", ckpt, "--out", tmp_path / "teacher.safetensors")
    run_cli("sample", "--ckpt", tmp_path / "teacher.safetensors", "--n", 2000, "--seed", 7, "--out", tmp_path / "b.npy")
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (2000, 2) and np.isfinite(a).all()
    # `lit-gen sample` returns points in the data's own units on the mixture's modes, with roughly its weights.
    metrics = mixture_metrics(a, TOY2D["gmm8"])
    assert metrics["modes_covered"] == 8 and metrics["mode_tv"] < 0.15 and metrics["off_mode"] < 0.2, metrics
    assert np.array_equal(a, b)
    run_cli("sample", "--ckpt", ckpt, "--n", 2000, "--seed", 8, "--out", tmp_path / "c.npy")
    assert not np.array_equal(a, np.load(tmp_path / "c.npy"))
    run_cli("sample", "--ckpt", ckpt, "--n", 2000, "--out", tmp_path / "picture.png")
    assert (tmp_path / "picture.png").stat().st_size > 1000
    # Raw (non-EMA) weights differ from the EMA ones and can be exported on request.
    raw = export(ckpt, tmp_path / "raw.safetensors", weights="raw")
    ema_model, raw_model = load_model(tmp_path / "teacher.safetensors"), load_model(raw)
    differs = [
        not torch.equal(p, q) for p, q in zip(ema_model.net.parameters(), raw_model.net.parameters(), strict=True)
    ]
    assert any(differs)
    assert (toy_teacher_run / "tb").is_dir()


@pytest.mark.slow
def test_resume_with_ckpt_path_last_continues_the_run(toy_teacher_run: Path, toy_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "resumed"
    shutil.copytree(toy_teacher_run, root)
    before = read_checkpoint(root / "checkpoints" / "last.ckpt")
    fit_toy_teacher(toy_shards, root, 650, "--ckpt_path", "last", "--model.init_args.decay_steps", 700)
    after = read_checkpoint(root / "checkpoints" / "last.ckpt")
    # 650 is not a multiple of the 100-step interval: callbacks.checkpoint.Checkpoint still saves the final step,
    # into the same last.ckpt (no last-v1.ckpt although the run folder was copied).
    assert before["global_step"] == 600 and after["global_step"] == 650
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    # The EMA continued from the saved average (not restarted from a copy of the raw weights).
    assert after["callbacks"] and after["lit_gen"]["has_ema"]
    ema, raw = after["ema_state_dict"], after["state_dict"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())


def test_resuming_with_another_methods_checkpoint_is_refused() -> None:
    module = TeacherDiffusion(net=MLPDenoiser(dim=2))
    with pytest.raises(LitGenError, match="not 'teacher'"):
        module.on_load_checkpoint({"lit_gen": {"method": "tract", "net": {}}})
    with pytest.raises(LitGenError, match="not written by lit_gen"):
        module.on_load_checkpoint({"state_dict": {}})
