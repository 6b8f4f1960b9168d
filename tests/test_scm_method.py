"""The sCM LightningModule (sCD / sCT, Lu & Song 2024): the student starts as the converted teacher, dropout 0 and an
eval-mode tangent pass, the tangent warm-up, the adaptive weight in the optimizer, JVP modes, the checkpoint's
sampling section and `lit-gen sample --steps 1|2` on it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lit_gen.diffusion import EDM
from lit_gen.diffusion.trigflow import TrigFlow
from lit_gen.errors import LitGenError
from lit_gen.export import LoadedModel
from lit_gen.methods.scm import SCM
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser


def write_teacher(path: Path, dropout: float = 0.0, seed: int = 0) -> Path:
    """A small EDM teacher file with a perturbed (non-zero) output layer."""
    torch.manual_seed(seed)
    teacher = TeacherDiffusion(net=MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, dropout=dropout))
    with torch.no_grad():
        for p in teacher.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher.data_info = {"shape": [2], "num_classes": 0, "kind": "points"}
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    return path


def test_scd_student_starts_as_the_converted_teacher(tmp_path: Path) -> None:
    method = SCM(teacher=str(write_teacher(tmp_path / "t.ckpt", dropout=0.2)))
    assert isinstance(method.param, TrigFlow) and isinstance(method.teacher_param, EDM)
    assert method.param.time_conditioning == "edm" and method.param.sigma_data == 0.5
    # The copied student lost the teacher's dropout (students train with dropout 0), kept its weights.
    assert method.net.init_args["dropout"] == 0.0 and method.teacher_net.init_args["dropout"] == 0.2
    x, sigma = torch.randn(16, 2), torch.logspace(-2, 1.5, 16)
    with torch.no_grad():
        student = method.param.denoise(method.net, x, sigma)
        teacher = method.teacher_denoise(x, sigma)
    assert teacher.abs().max() > 0.1
    torch.testing.assert_close(student, teacher, atol=1e-5, rtol=1e-5)
    # The teacher velocity from x̂ is the student's own F at initialisation: the tangent's first term vanishes.
    t = torch.full((16,), 0.9)
    x_t = torch.randn(16, 2)
    with torch.no_grad():
        v = method.velocity(x_t, x_t, x_t, t, None)
        F = method.param.F(method.net, x_t / 0.5, t)
    torch.testing.assert_close(v, 0.5 * F, atol=1e-5, rtol=1e-5)
    # One optimizer over the student and w_φ; teacher frozen and in eval mode.
    ids = {id(p) for p in method.trainable_parameters()}
    assert ids == {id(p) for p in [*method.net.parameters(), *method.weight_net.parameters()]}
    method.train()
    assert method.net.training and not method.teacher_net.training


def test_set_up_errors(tmp_path: Path) -> None:
    teacher = str(write_teacher(tmp_path / "t.ckpt"))
    for bad, match in (
        ({"training": "gan"}, "training"),
        ({"jvp": "reverse"}, "jvp"),
        ({"mid_t": 1.6}, "mid_t"),
        ({"param": TrigFlow(time_conditioning="trigflow")}, "init_from_teacher false"),
        ({"net": MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, dropout=0.1)}, "dropout 0"),
    ):
        with pytest.raises(LitGenError, match=match):
            SCM(teacher=teacher, **bad)
    with pytest.raises(LitGenError, match="needs a teacher"):
        SCM(teacher=None, training="scd", net=MLPDenoiser(dim=2))
    with pytest.raises(LitGenError, match="needs a network"):
        SCM(teacher=None, training="sct")
    sct = SCM(teacher=None, training="sct", net=MLPDenoiser(dim=2, dropout=0.1))  # sCT may keep dropout
    assert sct.teacher_net is None and "teacher" not in sct.describe()


def test_tangent_pass_is_eval_mode_and_warmup(tmp_path: Path) -> None:
    method = SCM(teacher=str(write_teacher(tmp_path / "t.ckpt")), tangent_warmup_steps=10)
    assert method.tangent_warmup(0) == 0.0 and method.tangent_warmup(5) == 0.5 and method.tangent_warmup(50) == 1.0
    method.train()
    seen = []
    hook = method.net.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    x_t, t = torch.randn(8, 2), torch.full((8,), 0.7)
    method.tangent_pass(x_t, t, torch.randn(8, 2), None)
    hook.remove()
    assert seen and not any(seen) and method.net.training  # eval inside, train mode restored


@pytest.mark.parametrize("jvp", ["autograd", "finite"])
def test_training_loss_and_gradients(tmp_path: Path, jvp: str) -> None:
    method = SCM(teacher=str(write_teacher(tmp_path / "t.ckpt")), jvp=jvp, tangent_warmup_steps=0)
    method.train()
    torch.manual_seed(0)
    loss = method.scm_loss(torch.randn(64, 2) * 0.5, None).mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.net.parameters() if p.grad is not None]
    assert grads and any(g.abs().max() > 0 for g in grads)
    assert method.weight_net.out.weight.grad is not None
    # At initialisation F_θ = F_θ⁻ and w = 0: the per-sample loss is mean(g²) with ‖g‖ < 1 after normalisation.
    torch.manual_seed(0)
    with torch.no_grad():
        per = method.scm_loss(torch.randn(64, 2) * 0.5, None)
    assert float(per.max()) < 1.0 / 2 + 1e-6  # ‖g‖² < 1 spread over D = 2 elements


def test_autograd_and_finite_modes_agree(tmp_path: Path) -> None:
    losses = {}
    for jvp in ("autograd", "finite"):
        method = SCM(teacher=str(write_teacher(tmp_path / "t.ckpt")), jvp=jvp, tangent_warmup_steps=0)
        method.train()
        torch.manual_seed(3)
        with torch.no_grad():
            losses[jvp] = method.scm_loss(torch.randn(256, 2) * 0.5, None)
    torch.testing.assert_close(losses["finite"], losses["autograd"], atol=2e-3, rtol=2e-2)


def test_checkpoint_sampling_is_one_or_two_consistency_steps(tmp_path: Path) -> None:
    method = SCM(teacher=str(write_teacher(tmp_path / "t.ckpt")))
    method.data_info = {"shape": [2], "num_classes": 0, "kind": "points", "normalization": None}
    section = method.describe()
    sampling = section["sampling"]
    assert sampling["sampler"] == "consistency" and sampling["steps"] == 1 and sampling["grid_exact"] is True
    assert sampling["grid"] == [80.0, pytest.approx(0.5 * math.tan(1.1)), 0.0]
    assert section["scm"]["t_max"] == pytest.approx(math.atan(160.0))
    model = LoadedModel(net=method.net, param=method.param, description=section)
    one = model.sample(256, steps=1, seed=0, raw=True)
    two = model.sample(256, steps=2, seed=0, raw=True)
    assert one.shape == two.shape == (256, 2) and not torch.equal(one, two)
    # One step is f at σ_max from the seeded noise: reproduce it by hand.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=gen) * 80.0
    with torch.no_grad():
        expected = method.param.denoise(method.net, z, torch.full((256,), 80.0))
    torch.testing.assert_close(one, expected)
    with pytest.raises(LitGenError, match="--steps must be one of 1, 2"):
        model.sample(8, steps=3, raw=True)
