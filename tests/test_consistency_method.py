"""The consistency LightningModule: teacher vs student parameterisations, target network, shared dropout, CT
without a teacher, the checkpoint's sampling section, exact resume and a real toy2d distillation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gen.data.builtin import TOY2D, mixture_metrics
from lit_gen.diffusion import EDM
from lit_gen.diffusion.consistency import ConsistencyParam
from lit_gen.errors import LitGenError
from lit_gen.export import load_model
from lit_gen.methods.consistency import ConsistencyDistillation
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser
from lit_gen.spec import describe
from tests.conftest import REPO, run_cli
from tests.test_consistency_math import ExactGaussianF

F64 = torch.float64


def write_teacher(path: Path, **net_args: object) -> Path:
    """A small untrained EDM teacher file (zero output layer: D = c_skip x, exact for N(0, σ_data²) data)."""
    teacher = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=32, depth=2, **net_args))
    teacher.data_info = {"shape": [2], "num_classes": 0, "kind": "points"}
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    return path


def equal_modules(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def perturb(net: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def test_student_target_and_teacher_set_up(tmp_path: Path) -> None:
    method = ConsistencyDistillation(teacher=str(write_teacher(tmp_path / "t.ckpt")), num_scales=18)
    assert isinstance(method.param, ConsistencyParam) and isinstance(method.teacher_param, EDM)
    assert describe(method.param)["init_args"] == {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    assert equal_modules(method.net, method.teacher_net) and equal_modules(method.target_net, method.net)
    assert all(p.requires_grad for p in method.net.parameters())
    assert not any(p.requires_grad for p in [*method.target_net.parameters(), *method.teacher_net.parameters()])
    assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.net.parameters()}
    method.train()
    assert method.net.training and method.target_net.training and not method.teacher_net.training
    # The teacher is stepped with its own EDM denoiser, not the student's consistency function.
    perturb(method.teacher_net)
    x, sigma = torch.randn(4, 2), torch.full((4,), 0.7)
    torch.testing.assert_close(method.teacher_denoise(x, sigma), EDM().denoise(method.teacher_net, x, sigma))
    section = method.describe()
    assert section["method"] == "consistency" and section["param"] == describe(method.param)
    sampling = section["sampling"]
    assert sampling["sampler"] == "consistency" and sampling["steps"] == 1 and sampling["grid_exact"] is False
    grid = sampling["grid"]
    assert len(grid) == 19 and grid[0] == 80.0 and grid[-2] == pytest.approx(0.002) and grid[-1] == 0.0
    assert all(a > b for a, b in zip(grid[:-1], grid[1:], strict=False))
    for bad, match in (
        ({"distance": "ssim"}, "distance"),
        ({"training": "gan"}, "training"),
        ({"teacher_solver": "rk4"}, "teacher_solver"),
        ({"target_momentum": 1.0}, "target_momentum"),
        ({"param": EDM(sigma_data=0.3)}, "drop model.param"),
    ):
        with pytest.raises(LitGenError, match=match):
            ConsistencyDistillation(teacher=str(tmp_path / "t.ckpt"), **bad)
    with pytest.raises(LitGenError, match="needs a teacher"):
        ConsistencyDistillation(teacher=None, training="cd", net=MLPDenoiser(dim=2))


def test_zero_momentum_target_is_the_online_net_without_gradient(tmp_path: Path) -> None:
    method = ConsistencyDistillation(teacher=str(write_teacher(tmp_path / "t.ckpt")), num_scales=6)
    perturb(method.net)
    assert not equal_modules(method.target_net, method.net)
    method.update_target()
    assert equal_modules(method.target_net, method.net)
    loss = method.consistency_loss(torch.randn(32, 2) * 0.5, None, 6).mean()
    loss.backward()
    assert all(p.grad is None for p in method.target_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())
    # µ > 0: θ⁻ ← µθ⁻ + (1 − µ)θ.
    ema = ConsistencyDistillation(teacher=str(tmp_path / "t.ckpt"), target_momentum=0.75)
    before = [p.clone() for p in ema.target_net.parameters()]
    perturb(ema.net)
    ema.update_target()
    for old, new, online in zip(before, ema.target_net.parameters(), ema.net.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)


def test_online_and_target_passes_share_the_dropout_masks(tmp_path: Path) -> None:
    teacher = write_teacher(tmp_path / "t.ckpt", dropout=0.5)
    method = ConsistencyDistillation(teacher=str(teacher), num_scales=6, student_dropout=None)  # keep dropout
    perturb(method.net, 0.2)
    method.update_target()
    method.train()
    masks: dict[str, list[torch.Tensor]] = {"online": [], "target": []}
    for name, net in (("online", method.net), ("target", method.target_net)):
        for block in net.blocks:
            block.fc2.register_forward_hook(lambda mod, inp, out, key=name: masks[key].append(inp[0] == 0))
    torch.manual_seed(0)
    method.consistency_loss(torch.randn(64, 2) * 0.5, None, 6)
    assert len(masks["online"]) == len(masks["target"]) == 2
    for online, target in zip(masks["online"], masks["target"], strict=True):
        assert 0.3 < online.float().mean() < 0.7  # dropout is on ...
        assert torch.equal(online, target)  # ... with the same mask in both passes


def test_exact_student_of_an_exact_teacher_has_third_order_small_loss(tmp_path: Path) -> None:
    """Data N(0, σ_d²): the untrained teacher (F ≡ 0) is the exact denoiser and f* the exact consistency function;
    the CD mismatch with the Heun teacher step is O(Δσ³) (so the squared-L2 loss ~64x less per halving of Δσ)."""
    method = ConsistencyDistillation(teacher=str(write_teacher(tmp_path / "t.ckpt")))
    method.teacher_net.double()
    method.net = ExactGaussianF(method.param, 0.5)
    method.target_net = ExactGaussianF(method.param, 0.5)
    y = 0.5 * torch.randn(4096, 2, dtype=F64)
    torch.manual_seed(0)
    coarse = method.consistency_loss(y, None, 18)
    torch.manual_seed(0)
    fine = method.consistency_loss(y, None, 35)
    assert coarse.max() < 1e-3 and coarse.median() < 1e-8  # (a Δσ/σ ≈ 0.3 Heun step near σ_max is not exact)
    # l2 is squared: a Δσ³ mismatch gives Δσ⁶; the grid of 35 points has about half the spacing of 18.
    assert coarse.mean() / fine.mean() > 2**5
    method.teacher_solver = "euler"
    torch.manual_seed(0)
    assert method.consistency_loss(y, None, 18).mean() > 4 * coarse.mean()


def test_consistency_training_without_a_teacher(tmp_path: Path) -> None:
    net = MLPDenoiser(dim=2, hidden=32, depth=2)
    method = ConsistencyDistillation(
        teacher=None, training="ct", net=net, param=EDM(sigma_data=0.5), num_scales=41, curriculum_steps=30,
        initial_scales=11, sigma_sampling="lognormal", weighting="ict", distance="pseudo_huber",
    )  # fmt: skip
    assert method.teacher_net is None and method.teacher_path is None
    assert [method.scales_at(k) for k in (0, 9, 10, 20, 29, 100)] == [11, 11, 21, 41, 41, 41]
    method.attach_data({"shape": [2], "num_classes": 0, "kind": "points"})
    method.train()
    loss = method.consistency_loss(0.5 * torch.randn(16, 2), None, 21)
    assert loss.shape == (16,) and torch.all(loss >= 0)
    loss.mean().backward()
    section = method.describe()
    assert "teacher" not in section and section["consistency"]["training"] == "ct"
    assert len(section["sampling"]["grid"]) == 12  # the current N = 11 points (+ 0)
    with pytest.raises(LitGenError, match="no teacher"):
        method.teacher_denoise(torch.zeros(1, 2), torch.ones(1))
    # CT from a teacher: the student starts from it, the teacher is not kept.
    from_teacher = ConsistencyDistillation(teacher=str(write_teacher(tmp_path / "t.ckpt")), training="ct")
    assert from_teacher.teacher_net is None
    assert not any(k.startswith("teacher_net.") for k in from_teacher.state_dict())


def fit_cd(shards: Path, teacher: Path, root: Path, max_steps: int, *extra: object) -> Path:
    run_cli(
        "fit", "-c", REPO / "recipes/toy2d/cd.yaml", "--data.init_args.shards", shards,
        "--model.init_args.teacher", teacher, "--trainer.default_root_dir", root,
        "--trainer.max_steps", max_steps, "--model.init_args.decay_steps", max_steps,
        "--trainer.enable_progress_bar", "false", *extra,
    )  # fmt: skip
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_toy2d_cd_two_steps_beat_the_teachers_two_steps(toy_shards: Path, toy_teacher_run: Path, tmp_path: Path):
    teacher = toy_teacher_run / "checkpoints" / "last.ckpt"
    ckpt = fit_cd(toy_shards, teacher, tmp_path / "run", 300, "--data.init_args.batch_size", "512")
    mixture = TOY2D["gmm8"]
    teacher_2 = mixture_metrics(load_model(teacher).sample(4096, steps=2, sampler="euler", seed=1).numpy(), mixture)
    model = load_model(ckpt)
    assert type(model.param) is ConsistencyParam and model.description["sampling"]["sampler"] == "consistency"
    student_2 = mixture_metrics(model.sample(4096, steps=2, seed=1).numpy(), mixture)
    assert teacher_2["off_mode"] > 0.8  # two Euler steps of the teacher land between the modes
    assert student_2["off_mode"] < 0.6 * teacher_2["off_mode"] and student_2["modes_covered"] == 8
    assert student_2["mode_tv"] < teacher_2["mode_tv"] + 0.05
    # `lit-gen sample --steps 2` uses the student's own σ points and the consistency sampler.
    out = tmp_path / "s.npy"
    run_cli("sample", "--ckpt", ckpt, "--n", 256, "--steps", 2, "--out", out)
    np.testing.assert_allclose(np.load(out), model.sample(256, steps=2, seed=0).numpy(), rtol=1e-5, atol=1e-5)
