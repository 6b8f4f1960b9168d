"""Issue 16's fidelity defects, each as an invariant that failed before its fix (ALGORITHMS.md §7):

1. students (and f-distill's fake score) train with dropout 0, not the teacher's;
2. the fake score is deterministic inside the generator's DM term: fake = teacher ⇒ DM gradient exactly 0, for a net
   *with* dropout;
3. one noise distribution for the fake-score loss, the DM loss and the discriminator;
4. the discriminator reads every feature level, position-aware, with R1 and separate real/fake accuracies;
5. TRACT and BTD recipes share one optimiser treatment; TRACT's last phase gets most steps; BTD does not clip;
6. the toy CD recipe uses N = 18.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lit_gen.methods.consistency import ConsistencyDistillation
from lit_gen.methods.fdistill import FDistill, dsm_loss_at, ramp_position
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.methods.tract import TRACT
from lit_gen.nets import MLPDenoiser, UNet
from tests.conftest import REPO


def _save_teacher(net: torch.nn.Module, shape: list[int], path: Path, kind: str) -> Path:
    teacher = TeacherDiffusion(net=net)
    teacher.data_info = {"shape": shape, "num_classes": 0, "kind": kind}
    torch.save({"state_dict": teacher.state_dict(), "lit_gen": teacher.describe()}, path)
    return path


@pytest.fixture(scope="module")
def dropout_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy MLP teacher trained with dropout 0.1 (random, non-zero output so every term is non-trivial)."""
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=32, depth=2, dropout=0.1)
    torch.nn.init.normal_(net.proj_out.weight, std=0.3)
    return _save_teacher(net, [2], tmp_path_factory.mktemp("t") / "dropout_teacher.ckpt", "points")


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), dropout=0.1)  # fmt: skip
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)
    return _save_teacher(net, [1, 8, 8], tmp_path_factory.mktemp("t") / "unet_teacher.ckpt", "image")


def _dropout_rates(net: torch.nn.Module) -> set[float]:
    return {float(m.dropout) for m in net.modules() if hasattr(m, "dropout") and isinstance(m.dropout, float)}


# ------------------------------------------------------------------------------------------------ 1. dropout 0
@pytest.mark.parametrize("method_cls", [TRACT, ConsistencyDistillation, FDistill])
def test_students_train_without_the_teachers_dropout(dropout_teacher: Path, method_cls: type) -> None:
    kwargs = {"schedule": [8, 1], "steps_per_phase": 10} if method_cls is TRACT else {}
    method = method_cls(teacher=str(dropout_teacher), **kwargs)
    assert method.teacher_net.init_args["dropout"] == 0.1
    trained = [method.net] + ([method.fake_net] if method_cls is FDistill else [])
    for net in trained:
        assert net.init_args["dropout"] == 0.0 and _dropout_rates(net) == {0.0}
        for name, p in net.state_dict().items():  # still the teacher's weights
            assert torch.equal(p, method.teacher_net.state_dict()[name]), name
        net.train()
        x, c = torch.randn(64, 2), torch.zeros(64)
        assert torch.equal(net(x, c, None), net(x, c, None))  # deterministic in train mode
    assert method.describe()["net"]["init_args"]["dropout"] == 0.0  # what the checkpoint records
    keep = method_cls(teacher=str(dropout_teacher), student_dropout=None, **kwargs)
    assert _dropout_rates(keep.net) == {0.1}
    assert _dropout_rates(method_cls(teacher=str(dropout_teacher), student_dropout=0.05, **kwargs).net) == {0.05}


# ------------------------------------------------------------------------------------------------ 2. deterministic fake
@pytest.mark.parametrize("divergence", ["rkl", "js"])
def test_fake_equal_to_teacher_gives_exactly_zero_dm_gradient_with_dropout(dropout_teacher: Path, divergence: str):
    torch.manual_seed(0)
    # The fake score keeps the teacher's dropout 0.1 and is in train mode, as during training.
    method = FDistill(teacher=str(dropout_teacher), divergence=divergence, gan_weight=0.0, student_dropout=None)
    method.train()
    assert method.fake_net.training and _dropout_rates(method.fake_net) == {0.1}
    x0 = method.generate(torch.randn(512, 2), None)
    method.loss_generator(x0, None)["loss"].backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in method.net.parameters())
    assert method.fake_net.training  # the mode is restored after the DM term


# ------------------------------------------------------------------------------------------------ 3. one noise law
def _record_sigma(net: torch.nn.Module, store: list[torch.Tensor]):
    # EDM's c_noise = ln(σ)/4 (EDM Table 1): the network input tells which σ a loss used.
    return net.register_forward_pre_hook(lambda _m, args: store.append(torch.exp(4 * args[1].detach())))


@pytest.mark.parametrize("noise", ["ramp", "lognormal"])
def test_fake_score_dm_and_discriminator_share_one_noise_distribution(dropout_teacher: Path, noise: str) -> None:
    torch.manual_seed(0)
    method = FDistill(teacher=str(dropout_teacher), divergence="js", gan_fraction=0.0, noise=noise)
    fake_sigmas: list[torch.Tensor] = []
    dm_sigmas: list[torch.Tensor] = []
    x0 = method.generate(torch.randn(20000, 2), None).detach()
    handle = _record_sigma(method.fake_net, fake_sigmas)
    method.loss_fake_score(x0, None)
    handle.remove()
    handle = _record_sigma(method.teacher_net, dm_sigmas)
    method.loss_generator(x0, None)
    handle.remove()
    fake, dm = torch.cat(fake_sigmas), torch.cat(dm_sigmas)
    disc = method.disc_sigma(20000, x0)
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    # Compared as positions on the Karras ramp (uniform for ``ramp``: quantile noise ≈ 0.003 at n = 20000).
    q_fake, q_dm, q_disc = (torch.quantile(ramp_position(s.double(), 0.002, 80.0), quantiles) for s in (fake, dm, disc))
    torch.testing.assert_close(q_fake, q_dm, atol=0.015, rtol=0)
    torch.testing.assert_close(q_disc, q_dm, atol=0.015, rtol=0)
    if noise == "ramp":  # DMD2's uniform ramp position: half of the levels above σ(0.5) ≈ 2.5, not EDM's 4 %
        assert abs(float((fake > 2.5).double().mean()) - 0.5) < 0.03
    # The GAN terms' own range: a fraction gan_fraction of the discriminator's samples lies in [σ(0), σ(0.5)].
    method.gan_fraction = 0.5
    low = float(method.in_gan_range(method.disc_sigma(20000, x0)).double().mean())
    shared = float(method.in_gan_range(method.sample_noise(20000, x0)[1]).double().mean())
    assert abs(low - (0.5 + 0.5 * shared)) < 0.02
    if noise == "ramp":  # t ~ U[0.02, 0.98] lies in [0, 0.5] half of the time
        assert abs(shared - 0.5) < 0.02


def test_fake_score_loss_is_the_teachers_weighted_dsm(dropout_teacher: Path) -> None:
    method = FDistill(teacher=str(dropout_teacher))
    y, sigma, noise = torch.randn(16, 2), torch.rand(16) * 5 + 0.01, torch.randn(16, 2)
    with torch.no_grad():
        d = method.param.denoise(method.fake_net.eval(), y + sigma[:, None] * noise, sigma, None)
        expected = (method.param.loss_weight(sigma)[:, None] * (d - y) ** 2).mean(1)
        torch.testing.assert_close(dsm_loss_at(method.param, method.fake_net, y, sigma, None, noise), expected)


# ------------------------------------------------------------------------------------------------ 4. discriminator
def test_discriminator_reads_every_feature_level(unet_teacher: Path) -> None:
    torch.manual_seed(0)
    method = FDistill(teacher=str(unet_teacher), divergence="js")
    levels = method.teacher_net.feature_levels(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    assert [list(f.shape[1:]) for f in levels] == [[8, 8, 8], [16, 4, 4]]
    assert len(method.disc.heads) == 2 and not any(h.pool for h in method.disc.heads)
    for head in method.disc.heads:
        torch.nn.init.normal_(head.out.weight)
    feats = [f.requires_grad_(True) for f in method.teacher_net.feature_levels(
        torch.randn(4, 1, 8, 8), torch.zeros(4))]  # fmt: skip
    grads = torch.autograd.grad(method.disc(feats).sum(), feats)
    assert all(float(g.abs().sum()) > 0 for g in grads)
    # Position-aware: the logit changes when a level's map is moved by one position (a mean-pooled head of
    # translation-equivariant convs would barely notice).
    with torch.no_grad():
        shifted = [feats[0].roll(2, dims=-1), feats[1]]
        assert not torch.allclose(method.disc(feats), method.disc(shifted))


def test_dmd2_head_on_the_fake_score_trains_it_and_the_generator_view_is_detached(unet_teacher: Path) -> None:
    torch.manual_seed(0)
    method = FDistill(teacher=str(unet_teacher), divergence="js", gan_weight=1.0, disc_features="fake_score")
    for head in method.disc.heads:
        torch.nn.init.normal_(head.out.weight)
    x0 = method.generate(torch.randn(8, 1, 8, 8), None)
    method.loss_generator(x0, None)["loss"].backward()
    assert all(p.grad is None for p in method.fake_net.parameters())  # the generator's GAN term: fake score frozen
    assert all(p.grad is None for p in method.disc.parameters())
    assert any(torch.count_nonzero(p.grad) > 0 for p in method.net.parameters())
    method.net.zero_grad(set_to_none=True)
    d = method.loss_discriminator(x0.detach(), torch.randn(8, 1, 8, 8), None, None)
    d["loss"].backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in method.fake_net.parameters())


def test_exact_r1_is_the_squared_input_gradient_of_the_real_logit(dropout_teacher: Path) -> None:
    torch.manual_seed(0)
    method = FDistill(teacher=str(dropout_teacher), divergence="js", r1_weight=1.0, r1_kind="grad", gan_fraction=0.0)
    x0, y = torch.randn(32, 2), torch.randn(32, 2)
    torch.manual_seed(1)
    out = method.loss_discriminator(x0, y, None, None)
    torch.manual_seed(1)
    method.disc_sigma(32, x0)  # the generated samples draw first, as in loss_discriminator
    sigma_r = method.disc_sigma(32, y)
    torch.randn_like(x0)
    x_real = (y + sigma_r[:, None] * torch.randn_like(y)).requires_grad_(True)
    (grad,) = torch.autograd.grad(method.logits(x_real, sigma_r, None).sum(), x_real)
    torch.testing.assert_close(out["r1"], grad.pow(2).sum(1).mean(), rtol=1e-4, atol=1e-6)
    assert float(out["r1"]) > 0


# ------------------------------------------------------------------------------------------------ 5-6. recipes
def _model_args(recipe: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / recipe).read_text())["model"]["init_args"]


@pytest.mark.parametrize("dataset", ["toy2d", "digits"])
def test_tract_and_btd_recipes_share_one_optimiser_treatment(dataset: str) -> None:
    tract, btd = _model_args(f"{dataset}/tract.yaml"), _model_args(f"{dataset}/btd.yaml")
    assert tract["optimizer"] == btd["optimizer"]
    for args in (tract, btd):
        assert not args.get("lr_decay_per_phase", False) and not args.get("decay_steps", 0)
    tract_steps = tract["steps_per_phase"]
    btd_steps = btd["steps_per_phase"] * (len(btd["schedule"]) - 1)
    assert sum(tract_steps) == btd_steps  # equal budget
    assert tract_steps[-1] > sum(tract_steps) / 2  # the last phase gets most of the steps
    assert btd.get("clip_denoised") is None  # progressive distillation does not clip x-hat


def test_toy_cd_recipe_uses_18_scales() -> None:
    assert _model_args("toy2d/cd.yaml")["num_scales"] == 18
