"""Guidance as a student input (Meng et al. 2023) and autoguided teachers (Karras et al. 2024) in every distillation
method (issue 18): zero-initialised w embedding, per-sample guided targets, recorded ranges, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lit_gen.diffusion import AutoGuidanceDenoiser, guide
from lit_gen.diffusion.guidance import GuidanceBound
from lit_gen.diffusion.tract import closure_target
from lit_gen.errors import LitGenError
from lit_gen.export import export, load_model
from lit_gen.methods.consistency import ConsistencyDistillation
from lit_gen.methods.distill import DistillationMethod, GuidedLabel, parse_guidance
from lit_gen.methods.fdistill import FDistill
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.methods.tract import TRACT
from lit_gen.nets import DiT, MLPDenoiser, UNet
from tests.conftest import run_cli

INFO = {"shape": [2], "num_classes": 3, "kind": "points", "normalize": {"shift": 0.0, "scale": 1.0}}


def _teacher_file(path: Path, hidden: int = 32, num_classes: int = 3, dim: int = 2, seed: int = 0) -> Path:
    """A class-conditional MLP teacher checkpoint with non-zero output (cond and uncond differ)."""
    torch.manual_seed(seed)
    net = MLPDenoiser(dim=dim, hidden=hidden, depth=2, num_classes=num_classes)
    torch.nn.init.normal_(net.proj_out.weight, std=0.5)
    teacher = TeacherDiffusion(net=net, label_dropout=0.1 if num_classes else 0.0)
    teacher.data_info = {**INFO, "shape": [dim], "num_classes": num_classes}
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "teacher": _teacher_file(tmp_path / "teacher.ckpt"),
        "bad": _teacher_file(tmp_path / "bad.ckpt", hidden=16, seed=1),
        "other_classes": _teacher_file(tmp_path / "c5.ckpt", hidden=16, num_classes=5, seed=2),
        "other_shape": _teacher_file(tmp_path / "d3.ckpt", hidden=16, dim=3, seed=3),
    }


def _methods(teacher: Path, guidance: object, **kw: object) -> list[DistillationMethod]:
    return [
        TRACT(teacher=str(teacher), schedule=(8, 1), steps_per_phase=10, guidance=guidance, **kw),
        ConsistencyDistillation(teacher=str(teacher), num_scales=8, guidance=guidance, **kw),
        FDistill(teacher=str(teacher), guidance=guidance, gan_weight=0.0, divergence="rkl", **kw),
    ]


# ------------------------------------------------------------------------------------------------- the nets
@pytest.mark.parametrize(
    "make",
    [
        lambda g: MLPDenoiser(dim=2, hidden=32, depth=2, num_classes=3, guidance_embed=g),
        lambda g: UNet(8, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, num_classes=3, guidance_embed=g),
        lambda g: DiT(8, 1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3, guidance_embed=g),
    ],
    ids=["mlp", "unet", "dit"],
)
def test_guidance_embedding_is_zero_initialised_and_omitted_when_off(make) -> None:
    torch.manual_seed(0)
    plain = make(False)
    torch.manual_seed(0)
    wcond = make(True)
    assert "guidance_embed" not in plain.init_args and wcond.init_args["guidance_embed"] is True
    # a net without it draws the same weights as before the option existed; the extra tensors are map_guide.*
    extra = set(wcond.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("map_guide.") for k in extra)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, wcond.state_dict()[k]), k
    for p in plain.parameters():  # the nets' zero output layers would hide any difference
        torch.nn.init.normal_(p, std=0.3) if p.ndim > 1 else None
    wcond.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), wcond.eval()  # no dropout
    shape = [4, 2] if isinstance(plain, MLPDenoiser) else [4, 1, 8, 8]
    x, c, label = torch.randn(*shape), torch.randn(4), torch.tensor([0, 1, 2, 3])
    ref = plain(x, c, label)
    for w in (0.0, 1.0, 2.5, 7.0):
        assert torch.equal(wcond(x, c, label, c_guide=torch.full((4,), w)), ref)
    torch.nn.init.normal_(wcond.map_guide.proj.weight)
    assert not torch.allclose(wcond(x, c, label, c_guide=torch.full((4,), 1.0)), ref)


# ---------------------------------------------------------------------------------- students start as teacher
def test_untrained_w_conditioned_student_equals_teacher_copy_for_every_w(files: dict[str, Path]) -> None:
    for method in _methods(files["teacher"], [1.0, 4.0]):
        assert method.net.map_guide is not None and method.guidance_range == (1.0, 4.0)
        teacher_param = getattr(method, "teacher_param", method.param)
        x, sigma, label = torch.randn(6, 2), torch.full((6,), 0.9), torch.tensor([0, 1, 2, 0, 1, 2])
        ref = method.param.denoise(method.teacher_net, x, sigma, label)
        for w in (1.0, 1.7, 4.0):
            ww = torch.full((6,), w)
            out = method.param.denoise(GuidanceBound(method.net, ww), x, sigma, label)
            assert torch.equal(out, ref), (type(method).__name__, w)
        if isinstance(method, FDistill):  # the fake score is w-conditioned too and starts as the teacher
            fake = teacher_param.denoise(GuidanceBound(method.fake_net, torch.full((6,), 3.0)), x, sigma, label)
            assert torch.equal(fake, teacher_param.denoise(method.teacher_net, x, sigma, label))


# ----------------------------------------------------------------------------------------- per-sample targets
def test_mixed_w_target_equals_per_sample_cfg_and_autoguidance(files: dict[str, Path]) -> None:
    x, sigma = torch.randn(6, 2), torch.linspace(0.2, 3.0, 6)
    label, w = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0, 2.5])
    for guide_teacher in (None, str(files["bad"])):
        mixed = DistillationMethod(teacher=str(files["teacher"]), guidance=[1.0, 4.0], guide_teacher=guide_teacher)
        out = mixed.teacher_denoise(x, sigma, label, w)
        for i in range(6):
            fixed = DistillationMethod(teacher=str(files["teacher"]), guidance=float(w[i]), guide_teacher=guide_teacher)
            one = fixed.teacher_denoise(x[i : i + 1], sigma[i : i + 1], label[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], one, rtol=1e-6, atol=1e-6)
        # the formula itself: CFG x̂_∅ + w (x̂_c − x̂_∅), autoguidance D_bad + w (D − D_bad)
        cond = mixed.param.denoise(mixed.teacher_net, x, sigma, label)
        if guide_teacher is None:
            other = mixed.param.denoise(mixed.teacher_net, x, sigma, torch.full_like(label, 3))
        else:
            other = mixed.guide_param.denoise(mixed.guide_net, x, sigma, label)
        torch.testing.assert_close(out, other + w[:, None] * (cond - other))


def test_fdistill_guidance_interval_targets_the_conditional_teacher_above_sigma_max(files: dict[str, Path]) -> None:
    """``guidance_sigma_max``: the DM term's target is the guided teacher at σ ≤ σ_g and the unguided (w = 1)
    conditional teacher above it, per sample, for a w-conditioned and a fixed-w student; 0 keeps w everywhere."""
    sigma = torch.tensor([0.1, 0.9, 1.0, 1.1, 5.0, 40.0])
    w = torch.tensor([4.0, 3.0, 2.0, 4.0, 3.5, 2.5])
    x, label = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    wcond = FDistill(teacher=str(files["teacher"]), guidance=[1.0, 4.0], gan_weight=0.0, divergence="rkl",
                     guidance_sigma_max=1.0)  # fmt: skip
    assert torch.equal(wcond.dm_guidance(sigma, w), torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 1.0]))
    target = wcond.teacher_denoise(x, sigma, label, wcond.dm_guidance(sigma, w))
    guided = wcond.teacher_denoise(x, sigma, label, w)
    unguided = wcond.teacher_denoise(x, sigma, label, torch.ones(6))
    torch.testing.assert_close(target[:3], guided[:3])
    torch.testing.assert_close(target[3:], unguided[3:])
    assert not torch.allclose(guided[3:], unguided[3:])  # the teacher's CFG does change those rows
    fixed = FDistill(teacher=str(files["teacher"]), guidance=3.0, gan_weight=0.0, divergence="rkl",
                     guidance_sigma_max=1.0)  # fmt: skip
    assert torch.equal(fixed.dm_guidance(sigma, None), torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    off = FDistill(teacher=str(files["teacher"]), guidance=[1.0, 4.0], gan_weight=0.0, divergence="rkl")
    assert off.dm_guidance(sigma, w) is w
    # wired into the generator's loss: an interval below every σ is the unguided student's loss, bit for bit
    kw = {"teacher": str(files["teacher"]), "gan_weight": 0.0, "divergence": "rkl"}
    losses = []
    for extra in ({"guidance": 3.0, "guidance_sigma_max": 1e-9}, {"guidance": 1.0}, {"guidance": 3.0}):
        method = FDistill(**kw, **extra)
        torch.manual_seed(0)
        losses.append(method.loss_generator(torch.randn(8, 2), torch.arange(8) % 3)["dm"])
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    with pytest.raises(LitGenError, match="guidance_sigma_max must be >= 0"):
        FDistill(teacher=str(files["teacher"]), guidance_sigma_max=-1.0)


def test_tract_closure_target_keeps_each_rows_w(files: dict[str, Path]) -> None:
    """The Heun corrector and the second hop evaluate subsets of rows: w must stay with its row."""
    method = TRACT(teacher=str(files["teacher"]), schedule=(8, 1), steps_per_phase=10, guidance=[1.0, 4.0])
    torch.nn.init.normal_(method.self_teacher.map_guide.proj.weight)  # w now changes the self-teacher
    grid = method.grid64.float()
    torch.manual_seed(5)
    i_t, i_t1, i_s = method.phases.sample_indices(0, 4, "tract")
    assert bool((grid[i_t1] > grid[i_s]).any()) and bool((grid[i_t1] > 0).any())  # both row subsets are used
    x = torch.randn(4, 2)
    label, w = torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 3.5, 2.0, 4.0])
    args = (x, grid[i_t], grid[i_t1], grid[i_s])
    both = closure_target(method.teacher_hop(), method.self_teacher_hop(), *args, GuidedLabel(label, w))
    for i in range(4):
        rows = [i]
        one = closure_target(
            method.teacher_hop(),
            method.self_teacher_hop(),
            *(a[rows] for a in args),
            GuidedLabel(label[rows], w[rows]),
        )
        torch.testing.assert_close(both[rows], one, rtol=1e-5, atol=1e-6)


def test_fixed_w_and_w_conditioned_at_one_w_give_the_same_loss(files: dict[str, Path]) -> None:
    y, label = torch.randn(16, 2) * 0.5, torch.randint(0, 3, (16,))
    fixed, wcond = _methods(files["teacher"], 2.0), _methods(files["teacher"], [2.0, 2.0])
    for a, b in zip(fixed, wcond, strict=True):
        losses = []
        for method in (a, b):
            torch.manual_seed(7)
            if isinstance(method, TRACT):
                loss = method.distillation_loss(y, label)
            elif isinstance(method, ConsistencyDistillation):
                loss = method.consistency_loss(y, label, 8)
            else:
                w = method.sample_guidance(16, y.device)
                x0 = method.generate(torch.randn_like(y), label, w)
                loss = method.loss_generator(x0, label, w)["dm"] + method.loss_fake_score(x0, label, w)
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
        assert float(losses[0].detach().sum()) > 0


# --------------------------------------------------------------------------------------------- sampling
def _student_file(method: DistillationMethod, path: Path) -> Path:
    method.data_info = INFO
    section = method.describe()
    section["has_ema"] = bool(section.get("ema_prefix"))
    torch.save({"state_dict": method.state_dict(), "lit_gen": section}, path)
    return path


def test_checkpoint_and_export_record_range_and_sample_feeds_w(files: dict[str, Path], tmp_path: Path) -> None:
    method = TRACT(teacher=str(files["teacher"]), schedule=(8, 1), steps_per_phase=10, guidance=[1.0, 4.0])
    torch.nn.init.normal_(method.net_ema.map_guide.proj.weight)  # the exported (inference EMA) net depends on w
    ckpt = _student_file(method, tmp_path / "student.ckpt")
    for path in (ckpt, export(ckpt, tmp_path / "student.safetensors")):
        loaded = load_model(path)
        assert loaded.guidance_range == (1.0, 4.0)
        assert loaded.description["teacher"]["guidance_range"] == [1.0, 4.0]
        a = loaded.sample(32, steps=1, seed=3, guidance=2.0, raw=True)
        b = loaded.sample(32, steps=1, seed=3, guidance=3.0, raw=True)
        assert not torch.allclose(a, b)
        # by hand: one DDIM jump from σ_max with c_guide = 2 (no unconditional call)
        gen = torch.Generator().manual_seed(3)
        sigma_max = loaded.description["sampling"]["grid"][0]
        lab = torch.randint(0, 3, (32,), generator=gen)
        z = torch.randn(32, 2, generator=gen) * sigma_max
        expect = loaded.param.denoise(
            GuidanceBound(loaded.net, torch.full((32,), 2.0)), z, torch.full((32,), sigma_max), lab
        )
        torch.testing.assert_close(a, expect, rtol=1e-5, atol=1e-5)
        with pytest.raises(LitGenError, match=r"outside the w range .* \[1, 4\].*--allow-extrapolation"):
            loaded.sample(4, steps=1, guidance=5.0)
        assert loaded.sample(4, steps=1, guidance=5.0, allow_extrapolation=True).shape == (4, 2)


def test_teacher_file_carries_its_guiding_model(files: dict[str, Path], tmp_path: Path) -> None:
    out = export(files["teacher"], tmp_path / "t.safetensors", guide=files["bad"])
    loaded = load_model(out)
    bad = load_model(files["bad"])
    assert loaded.guide is not None
    for k, v in bad.net.state_dict().items():
        assert torch.equal(loaded.guide.net.state_dict()[k], v)
    got = loaded.sample(16, steps=4, seed=1, guidance=2.0, raw=True)
    good = load_model(files["teacher"])
    expect = good.sample(16, steps=4, seed=1, raw=True)  # same noise draws, different denoiser below
    assert not torch.allclose(got, expect)
    # the same as the teacher autoguided by the separate guiding model
    from lit_gen.diffusion import sample

    gen = torch.Generator().manual_seed(1)
    shape = [16, 2]
    labels = torch.randint(0, 3, (16,), generator=gen)
    den = AutoGuidanceDenoiser(good.denoiser(), bad.denoiser(), 2.0)
    by_hand = sample(den, shape, steps=4, sampler="heun", sigma_min=0.002, sigma_max=80.0, label=labels, generator=gen)
    torch.testing.assert_close(got, by_hand)
    # a distillation method reads the carried guide without guide_teacher
    method = DistillationMethod(teacher=str(out), guidance=[1.0, 3.0])
    assert method.guide_net is not None and method.describe()["teacher"]["guidance_kind"] == "autoguidance"


# --------------------------------------------------------------------------------------------- bad input
def test_bad_guidance_inputs_are_one_line_errors(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = str(files["teacher"])
    with pytest.raises(LitGenError, match=r"w_min <= w_max, got \[3, 1\]"):
        TRACT(teacher=teacher, guidance=[3, 1])
    with pytest.raises(LitGenError, match="number or a pair"):
        parse_guidance([1.0, 2.0, 3.0])
    with pytest.raises(LitGenError, match="has 5 classes but the teacher"):
        ConsistencyDistillation(teacher=teacher, guidance=2.0, guide_teacher=str(files["other_classes"]))
    with pytest.raises(LitGenError, match="shape \\[3\\] but the teacher"):
        FDistill(teacher=teacher, guidance=[1, 2], guide_teacher=str(files["other_shape"]))
    with pytest.raises(LitGenError, match="guide_teacher .* does not exist"):
        TRACT(teacher=teacher, guidance=2.0, guide_teacher=str(tmp_path / "nope.ckpt"))
    with pytest.raises(LitGenError, match="guidance input: set guidance_embed"):
        TRACT(teacher=teacher, guidance=[1, 2], net=MLPDenoiser(dim=2, hidden=32, depth=2, num_classes=3))
    with pytest.raises(LitGenError, match="classes but"):
        export(files["teacher"], tmp_path / "x.safetensors", guide=files["other_classes"])
    uncond = tmp_path / "uncond.ckpt"
    _teacher_file(uncond, num_classes=0)
    with pytest.raises(LitGenError, match="class-conditional teacher .* or a guide_teacher"):
        DistillationMethod(teacher=str(uncond), guidance=[1, 3])
    # an unconditional teacher with a guiding model is fine (autoguidance needs no classes)
    bad_uncond = _teacher_file(tmp_path / "bad_uncond.ckpt", hidden=16, num_classes=0, seed=4)
    assert DistillationMethod(teacher=str(uncond), guidance=[1, 3], guide_teacher=str(bad_uncond)).guide_net
    # the CLI: --guidance on an unconditional model, w outside a student's range: one line, exit status 2
    student = _student_file(
        TRACT(teacher=teacher, schedule=(8, 1), steps_per_phase=10, guidance=[1.5, 3.0]), tmp_path / "s.ckpt"
    )
    for ckpt, guidance, message in (
        (uncond, "2", "needs a class-conditional model"),
        (student, "4", "outside the w range"),
        (student, None, "trained on w in \\[1.5, 3\\]: pass --guidance w"),
    ):
        args = ["sample", "--ckpt", ckpt, "--n", "4", "--out", tmp_path / "o.npy"]
        with pytest.raises(SystemExit) as info:
            run_cli(*args, *(["--guidance", guidance] if guidance else []))
        assert info.value.code == 2
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lit-gen: error:"), lines
        assert re.search(message, lines[0]), lines[0]


def test_guide_per_sample_scale_broadcasts() -> None:
    c, u = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    w = torch.tensor([1.0, 2.0, 0.0])
    out = guide(c, u, w)
    torch.testing.assert_close(out[0], c[0])
    torch.testing.assert_close(out[1], u[1] + 2 * (c[1] - u[1]))
    torch.testing.assert_close(out[2], u[2])


def test_tract_phase_change_hands_the_w_conditioned_student_on_as_teacher(files: dict[str, Path]) -> None:
    method = TRACT(teacher=str(files["teacher"]), schedule=(8, 4, 1), steps_per_phase=[5, 5], guidance=[1.0, 4.0])
    assert method.teacher_net.map_guide is not None  # inert (zero) until the first phase change
    torch.nn.init.normal_(method.net_ema.map_guide.proj.weight)
    method.enter_phase(1)
    for k, v in method.net_ema.state_dict().items():
        assert torch.equal(method.teacher_net.state_dict()[k], v), k
    x, sigma_t, sigma_s = torch.randn(4, 2), torch.full((4,), 2.0), torch.full((4,), 0.5)
    label, w = torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    hop = method.teacher_hop()(x, sigma_t, sigma_s, GuidedLabel(label, w))
    x_hat = method.param.denoise(GuidanceBound(method.net_ema, w), x, sigma_t, label)
    torch.testing.assert_close(hop, x_hat + (sigma_s / sigma_t)[:, None] * (x - x_hat))
    other = method.teacher_hop()(x, sigma_t, sigma_s, GuidedLabel(label, w.flip(0)))
    assert not torch.allclose(hop, other)


# ------------------------------------------------------------------------------- stage one (Meng et al. 2023)
class _AtStep:
    """Stands in for the Trainer where a method only reads ``global_step`` (which optimizer step this is)."""

    def __init__(self, step: int) -> None:
        self.global_step = step


def _stage_one_methods(teacher: Path, guidance: object, n: int) -> list[DistillationMethod]:
    return [
        TRACT(teacher=str(teacher), schedule=(8, 1), steps_per_phase=10, guidance=guidance, guidance_stage_one=n),
        ConsistencyDistillation(teacher=str(teacher), num_scales=8, guidance=guidance, guidance_stage_one=n),
    ]


def _loss(method: DistillationMethod, y: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(11)
    if isinstance(method, TRACT):
        return method.distillation_loss(y, label)
    return method.consistency_loss(y, label, 8)


def test_stage_one_regresses_onto_the_guided_teacher_then_hands_over(files: dict[str, Path]) -> None:
    y, label = torch.randn(32, 2) * 0.5, torch.randint(0, 3, (32,))
    for method in _stage_one_methods(files["teacher"], [1.0, 4.0], 3):
        teacher_param = getattr(method, "teacher_param", method.param)
        # the loss of step 0 is the stage-one regression: σ, n, w drawn in that order, target the guided teacher
        torch.manual_seed(11)
        sigma = teacher_param.sample_sigma(32)
        x = y + sigma[:, None] * torch.randn_like(y)
        w = method.sample_guidance(32, y.device)
        target = method.teacher_denoise(x, sigma, label, w)
        x_hat = method.param.denoise(GuidanceBound(method.net, w), x, sigma, label)
        expected = teacher_param.loss_weight(sigma) * (x_hat - target).pow(2).mean(dim=1)
        torch.testing.assert_close(_loss(method, y, label), expected, rtol=1e-6, atol=0)
        # from step N on, the method's own loss (equal to the run without stage one)
        method._trainer = _AtStep(3)
        plain = _stage_one_methods(files["teacher"], [1.0, 4.0], 0)[isinstance(method, ConsistencyDistillation)]
        torch.testing.assert_close(_loss(method, y, label), _loss(plain, y, label), rtol=0, atol=0)


def test_stage_one_is_zero_at_w_1_and_teaches_the_student_w(files: dict[str, Path]) -> None:
    """At w = 1 the guided target is the conditional teacher, which the untrained student copies: zero loss. Over a
    range, a few steps of stage one make the student respond to w as the teacher's guidance does."""
    y, label = torch.randn(64, 2) * 0.5, torch.randint(0, 3, (64,))
    for method in _stage_one_methods(files["teacher"], [1.0, 1.0], 5):
        if isinstance(method, TRACT):  # the TRACT student is the teacher's own parameterisation: exactly the copy
            assert float(_loss(method, y, label).detach().abs().max()) == 0.0
    method = TRACT(
        teacher=str(files["teacher"]), schedule=(8, 1), steps_per_phase=300, guidance=[1, 4], guidance_stage_one=200
    )
    opt = torch.optim.Adam(method.net.parameters(), lr=3e-3)
    x, sigma = torch.randn(64, 2), torch.full((64,), 0.8)

    @torch.no_grad()
    def response(fn) -> float:  # RMS change of x̂ between w = 1 and w = 4
        return float((fn(torch.full((64,), 4.0)) - fn(torch.full((64,), 1.0))).pow(2).mean().sqrt())

    def student(w: torch.Tensor) -> torch.Tensor:
        return method.param.denoise(GuidanceBound(method.net, w), x, sigma, label)

    teacher = response(lambda w: method.teacher_denoise(x, sigma, label, w))
    assert response(student) == 0.0 and teacher > 0.1
    first = float(_loss(method, y, label).mean())
    for step in range(150):
        torch.manual_seed(step)
        loss = method.stage_one_loss(y, label).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(_loss(method, y, label).mean()) < 0.3 * first
        assert 0.7 * teacher < response(student) < 1.3 * teacher, (response(student), teacher)


def test_stage_one_bad_input_is_one_line(files: dict[str, Path]) -> None:
    teacher = str(files["teacher"])
    with pytest.raises(LitGenError, match="needs guidance != 1"):
        TRACT(teacher=teacher, schedule=(8, 1), steps_per_phase=10, guidance_stage_one=3)
    with pytest.raises(LitGenError, match="steps >= 0"):
        TRACT(teacher=teacher, schedule=(8, 1), steps_per_phase=10, guidance=[1, 2], guidance_stage_one=-1)
    with pytest.raises(LitGenError, match="takes its steps from phase 0, which has 10"):
        TRACT(teacher=teacher, schedule=(8, 1), steps_per_phase=10, guidance=[1, 2], guidance_stage_one=10)
    with pytest.raises(LitGenError, match="consistency training has none"):
        ConsistencyDistillation(training="ct", net=MLPDenoiser(dim=2, hidden=8, depth=1), guidance_stage_one=3)


def test_frozen_teacher_and_guide_stay_in_eval_mode_in_every_method(files: dict[str, Path]) -> None:
    """Lightning calls ``.train()`` at fit start: a guiding model with dropout would otherwise add noise to every
    autoguided target (CD's own ``train`` used to re-eval only the teacher)."""
    for method in _methods(files["teacher"], [1.0, 3.0], guide_teacher=str(files["bad"])):
        method.train()
        assert method.net.training and not method.teacher_net.training, type(method).__name__
        assert not method.guide_net.training, type(method).__name__
