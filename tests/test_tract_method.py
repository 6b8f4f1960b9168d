"""The TRACT / BTD LightningModule: state, phase hand-over, guided teachers, exact resume, a real toy2d distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.errors import LitGenError
from lit_gen.export import load_model
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.methods.tract import TRACT
from lit_gen.nets import MLPDenoiser
from tests.conftest import REPO, run_cli


@pytest.fixture(scope="module")
def teacher_ckpt(toy_teacher_run: Path) -> Path:
    return toy_teacher_run / "checkpoints" / "last.ckpt"


def equal_modules(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_student_emas_and_self_teacher_start_as_the_teacher(teacher_ckpt: Path) -> None:
    method = TRACT(teacher=str(teacher_ckpt), schedule=(64, 8, 1), steps_per_phase=[5, 7])
    for copy in (method.net_ema, method.self_teacher):
        assert equal_modules(copy, method.teacher_net)
        assert all(not p.requires_grad for p in copy.parameters())
    assert equal_modules(method.net, method.teacher_net)
    assert all(p.requires_grad for p in method.net.parameters())
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.net.parameters()}
    method.train()
    assert method.net.training and not (method.net_ema.training or method.self_teacher.training)
    section = method.describe()
    assert section["ema_prefix"] == "net_ema." and section["tract"]["phase"] == 0
    assert section["sampling"]["steps"] == 8 and len(section["sampling"]["grid"]) == 9
    assert section["sampling"]["grid"][0] == 80.0 and section["sampling"]["grid"][-1] == 0.0
    assert (method.grid_kind, method.teacher_solver) == ("karras", "heun")  # EDM teacher -> EDM variant
    # BTD is the same class: no self-teacher, a halving schedule.
    btd = TRACT(teacher=str(teacher_ckpt), schedule=(8, 4, 2, 1), steps_per_phase=3, target="btd")
    assert btd.self_teacher is None and btd.describe()["sampling"]["steps"] == 4
    with pytest.raises(LitGenError, match="halves"):
        TRACT(teacher=str(teacher_ckpt), schedule=(64, 8, 1), target="btd")
    with pytest.raises(LitGenError, match="choose one of"):
        TRACT(teacher=str(teacher_ckpt), target="pd")
    with pytest.raises(LitGenError, match="VP teacher"):
        TRACT(teacher=str(teacher_ckpt), grid="cosine")


def test_phase_change_hands_the_inference_ema_to_the_teacher(teacher_ckpt: Path) -> None:
    method = TRACT(teacher=str(teacher_ckpt), schedule=(8, 2, 1), steps_per_phase=[4, 4], lr_decay_per_phase=True)
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method.update_emas()  # first update: both EMAs copy the student exactly
    assert equal_modules(method.net_ema, method.net) and equal_modules(method.self_teacher, method.net)
    assert not equal_modules(method.teacher_net, method.net)
    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(0.01)
    method.update_emas()
    assert not equal_modules(method.net_ema, method.net)
    method.enter_phase(1)
    assert int(method.phase) == 1 and equal_modules(method.teacher_net, method.net_ema)
    assert method.describe()["sampling"] == {
        "sampler": "ddim", "steps": 1, "grid": [80.0, 0.0], "grid_exact": True,
    }  # fmt: skip
    assert [round(method.lr_factor(k), 3) for k in range(8)] == [1.0, 0.75, 0.5, 0.25] * 2


def test_guidance_is_distilled_once(tmp_path: Path) -> None:
    """Phase 0 steps the CFG-guided teacher; from phase 1 on the teacher is a distilled (already guided) student."""
    net = MLPDenoiser(dim=2, hidden=32, depth=2, num_classes=3)
    torch.nn.init.normal_(net.proj_out.weight)
    teacher = TeacherDiffusion(net=net, label_dropout=0.1)
    teacher.data_info = {"shape": [2], "num_classes": 3, "kind": "points"}
    path = tmp_path / "cond.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    method = TRACT(teacher=str(path), schedule=(8, 2, 1), steps_per_phase=2, guidance=3.0)
    x, label = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    sigma_t, sigma_t1 = torch.full((5,), 2.0), torch.full((5,), 1.0)
    hop = method.teacher_hop()(x, sigma_t, sigma_t1, label)
    x_hat = method.teacher_denoise(x, sigma_t, label)  # guided
    plain = method.param.denoise(method.teacher_net, x, sigma_t, label)
    assert not torch.allclose(x_hat, plain)
    # Heun's first slope uses the guided x̂.
    d = (x - x_hat) / 2.0
    x_mid = x - d
    d2 = (x_mid - method.teacher_denoise(x_mid, sigma_t1, label)) / 1.0
    torch.testing.assert_close(hop, x - 0.5 * (d + d2))
    method.enter_phase(1)
    expected = plain + 0.5 * (x - plain)  # one unguided DDIM jump of the handed-over teacher
    torch.testing.assert_close(method.teacher_hop()(x, sigma_t, sigma_t1, label), expected)


def fit_tract(shards: Path, teacher: Path, root: Path, max_steps: int, *extra: object) -> Path:
    run_cli(
        "fit", "-c", REPO / "recipes/toy2d/tract.yaml", "--data.init_args.shards", shards,
        "--model.init_args.teacher", teacher, "--trainer.default_root_dir", root,
        "--trainer.max_steps", max_steps, "--trainer.enable_progress_bar", "false", *extra,
    )  # fmt: skip
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_toy2d_tract_one_step_beats_the_teachers_one_step(toy_shards: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    ckpt = fit_tract(
        toy_shards, teacher_ckpt, tmp_path / "run", 300,
        "--model.init_args.schedule", "[16, 1]", "--model.init_args.steps_per_phase", "300",
        "--data.init_args.batch_size", "256", "--model.init_args.optimizer.init_args.lr", "0.001",
    )  # fmt: skip
    mixture = TOY2D["gmm8"]
    teacher = mixture_metrics(load_model(teacher_ckpt).sample(4096, steps=1, sampler="euler", seed=1).numpy(), mixture)
    student_model = load_model(ckpt)
    assert student_model.description["sampling"]["grid"] == [80.0, 0.0]
    student = mixture_metrics(student_model.sample(4096, seed=1).numpy(), mixture)
    assert teacher["off_mode"] > 0.8  # one Euler step of the teacher lands between the modes
    assert student["off_mode"] < 0.6 * teacher["off_mode"], (student, teacher)
    assert student["modes_covered"] == 8 and student["mode_tv"] < min(0.15, teacher["mode_tv"]), (student, teacher)
    # `lit-gen sample --steps 1` uses the student's own grid; a step count it was not trained for is refused.
    out = tmp_path / "s.npy"
    run_cli("sample", "--ckpt", ckpt, "--n", 256, "--steps", 1, "--out", out)
    points = np.load(out)
    assert points.shape == (256, 2)
    np.testing.assert_allclose(points, student_model.sample(256, steps=1, seed=0).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        run_cli("sample", "--ckpt", ckpt, "--n", 16, "--steps", 2, "--out", tmp_path / "bad.npy")


def test_vp_teacher_gets_the_vp_variant(tmp_path: Path) -> None:
    """A VP teacher: cosine grid, DDIM teacher step, max(SNR, 1) loss; one-teacher-step segments give zero loss at
    initialisation (the target is the teacher's own x̂ = the student's), longer ones do not."""
    from lit_gen.diffusion import VP

    net = MLPDenoiser(dim=2, hidden=32, depth=2)
    torch.nn.init.normal_(net.proj_out.weight, std=0.3)
    teacher = TeacherDiffusion(net=net, param=VP(prediction="v"))
    teacher.data_info = {"shape": [2], "num_classes": 0, "kind": "points"}
    path = tmp_path / "vp.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    method = TRACT(teacher=str(path), schedule=(1024, 32, 1), steps_per_phase=10)
    assert (method.grid_kind, method.teacher_solver) == ("cosine", "euler")
    assert method.describe()["sampling"]["grid"][-1] == 0.0 and len(method.describe()["sampling"]["grid"]) == 33
    short = TRACT(teacher=str(path), schedule=(16, 8, 1), steps_per_phase=10)
    y = 0.5 * torch.randn(256, 2)
    torch.manual_seed(0)
    loss = short.distillation_loss(y, None).detach()
    torch.manual_seed(0)
    t, t1, s = short.phases.sample_indices(0, 256, "tract")
    one_step = t1 == s
    assert 0 < int(one_step.sum()) < 256
    assert float(loss[one_step].abs().max()) < 1e-6
    assert bool(torch.all(loss[~one_step] > 1e-8)) and bool(torch.isfinite(loss).all())


def test_data_seed_other_than_the_models_seed_is_accepted(toy_shards: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    """TRACT's `model.seed` and `data.seed` are independent knobs; Lightning's hparams merge for the logger used to
    refuse differing values with a traceback."""
    ckpt = fit_tract(toy_shards, teacher_ckpt, tmp_path / "run", 2, "--data.init_args.seed", 3,
                     "--trainer.logger", "true")  # fmt: skip
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["seed"] == 3
    assert checkpoint["hyper_parameters"]["seed"] == 0
