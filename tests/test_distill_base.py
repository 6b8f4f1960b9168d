"""The shared distillation base: teacher loading, student initialisation, mismatch errors, guided teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_gen.diffusion import EDM, VP, schedule_from_grid
from lit_gen.errors import LitGenError
from lit_gen.export import export
from lit_gen.methods.distill import DistillationMethod
from lit_gen.nets import MLPDenoiser


@pytest.fixture(scope="module")
def teacher_ckpt(toy_teacher_run: Path) -> Path:
    return toy_teacher_run / "checkpoints" / "last.ckpt"


def test_student_starts_as_teacher_and_teacher_is_frozen(teacher_ckpt: Path, tmp_path: Path) -> None:
    for path in (teacher_ckpt, export(teacher_ckpt, tmp_path / "t.safetensors")):
        method = DistillationMethod(teacher=str(path))
        for (name, a), (_, b) in zip(
            method.net.state_dict().items(), method.teacher_net.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
        assert all(not p.requires_grad for p in method.teacher_net.parameters())
        assert {id(p) for p in method.trainable_parameters()} == {id(p) for p in method.net.parameters()}
        method.train()
        assert method.net.training and not method.teacher_net.training
        x, sigma = torch.randn(4, 2), torch.full((4,), 1.3)
        assert torch.equal(method.teacher_denoise(x, sigma), method.param.denoise(method.net, x, sigma, None))
        assert method.data_info["shape"] == [2]


def test_mismatches_are_one_line_errors(teacher_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(LitGenError, match="uses .*VP"):
        DistillationMethod(teacher=str(teacher_ckpt), param=VP())
    with pytest.raises(LitGenError, match="differs from the teacher"):
        DistillationMethod(teacher=str(teacher_ckpt), net=MLPDenoiser(dim=2, hidden=64))
    with pytest.raises(LitGenError, match="class-conditional"):
        DistillationMethod(teacher=str(teacher_ckpt), guidance=2.0)
    with pytest.raises(LitGenError, match="does not exist"):
        DistillationMethod(teacher=str(tmp_path / "nope.ckpt"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(teacher_ckpt.read_bytes()[:1000])
    with pytest.raises(LitGenError, match="broken.ckpt"):
        DistillationMethod(teacher=str(broken))
    method = DistillationMethod(teacher=str(teacher_ckpt))
    with pytest.raises(LitGenError, match="shape \\[2\\] but the shards have shape \\[3\\]"):
        method.attach_data({"shape": [3], "num_classes": 0})
    assert DistillationMethod(teacher=str(teacher_ckpt), param=EDM(sigma_data=0.5, p_mean=-1.8, p_std=1.6))


def test_guided_teacher_is_cfg_of_conditional_teacher(tmp_path: Path) -> None:
    from lit_gen.methods.teacher import TeacherDiffusion

    net = MLPDenoiser(dim=2, hidden=32, depth=2, num_classes=3)
    torch.nn.init.normal_(net.proj_out.weight)  # a fresh net outputs zero; make cond and uncond differ
    teacher = TeacherDiffusion(net=net, label_dropout=0.1)
    teacher.data_info = {"shape": [2], "num_classes": 3, "kind": "points"}
    ckpt = {"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}
    path = tmp_path / "cond.ckpt"
    torch.save(ckpt, path)
    method = DistillationMethod(teacher=str(path), guidance=3.0)
    x, sigma, label = torch.randn(5, 2), torch.full((5,), 0.7), torch.tensor([0, 1, 2, 0, 1])
    cond = method.param.denoise(method.teacher_net, x, sigma, label)
    uncond = method.param.denoise(method.teacher_net, x, sigma, torch.full_like(label, 3))
    torch.testing.assert_close(method.teacher_denoise(x, sigma, label), cond + 2.0 * (cond - uncond))


def test_schedule_from_grid() -> None:
    grid = [80.0, 10.0, 2.0, 0.5, 0.0]
    assert schedule_from_grid(grid, 4).tolist() == grid
    assert schedule_from_grid(grid, 2).tolist() == [80.0, 2.0, 0.0]
    assert schedule_from_grid(grid, 1).tolist() == [80.0, 0.0]
    with pytest.raises(LitGenError, match="one of 1, 2, 4"):
        schedule_from_grid(grid, 3)
    assert len(schedule_from_grid(grid, 3, exact=False)) == 4


def test_student_is_trainable(teacher_ckpt: Path) -> None:
    method = DistillationMethod(teacher=str(teacher_ckpt))
    assert all(p.requires_grad for p in method.net.parameters())
