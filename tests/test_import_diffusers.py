"""`lit-gen import` of diffusers teachers: tiny models with random weights saved by diffusers' own save_pretrained
(nothing downloaded). The imported denoiser must equal the diffusers module's x̂ (every prediction type), DDIM on the
teacher's own timesteps must reproduce DDIMScheduler, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gen.diffusion.discrete import DiscreteVP
from lit_gen.diffusion.samplers import sample_ddim
from lit_gen.export import load_model
from lit_gen.importers.command import run_import
from tests.conftest import REPO, run_cli

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()


def _randomise(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some layers; random weights everywhere make every mapping mistake visible."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def make_unet(folder: Path, prediction_type: str = "epsilon", num_class_embeds: int | None = None, **sched) -> Path:
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )  # fmt: skip
    _randomise(model)
    model.save_pretrained(folder)
    diffusers.DDPMScheduler(prediction_type=prediction_type, **sched).save_pretrained(folder)
    return folder


def make_dit(folder: Path) -> Path:
    """A pipeline folder (model_index.json, transformer/, scheduler/) around a tiny DiT with learned variance."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=5, norm_type="ada_norm_zero",
    )  # fmt: skip
    _randomise(model)
    model.save_pretrained(folder / "transformer")
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


def make_cond_unet(folder: Path) -> Path:
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", norm_num_groups=8, num_class_embeds=4, cross_attention_dim=8,
    )  # fmt: skip
    _randomise(model)
    model.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")  # fmt: skip
    return folder / "unet"  # a model folder whose scheduler is its sibling


@pytest.fixture(scope="module")
def eps_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = make_unet(tmp_path_factory.mktemp("ddpm") / "unet")
    out = folder.parent / "teacher.safetensors"
    run_import(folder, out)
    return folder, out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_equals_the_diffusers_module(tmp_path: Path, prediction_type: str) -> None:
    """D(x, σ_i) = x − σ_i·ε_θ(√ᾱ_i x, t_i) (ε), √ᾱ_i z − √(1−ᾱ_i) v_θ (v), the output (sample): ≤ 1e-5."""
    folder = make_unet(tmp_path / "unet", prediction_type)
    out = tmp_path / "t.safetensors"
    report = run_import(folder, out)
    assert report["parameters"] == sum(p.numel() for p in diffusers.UNet2DModel.from_pretrained(folder).parameters())
    model = load_model(out)
    assert isinstance(model.param, DiscreteVP) and model.param.prediction_type == prediction_type
    reference = diffusers.UNet2DModel.from_pretrained(folder).double().eval()
    abar = diffusers.DDPMScheduler.from_pretrained(folder).alphas_cumprod.double()
    model.net.double()
    gen = torch.Generator().manual_seed(1)
    y = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    n = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    for t in (0, 10, 250, 500, 999):
        sigma = ((1 - abar[t]) / abar[t]).sqrt()
        x = y + sigma * n
        z = abar[t].sqrt() * x
        with torch.no_grad():
            out_ = reference(z, torch.full((3,), t), return_dict=False)[0]
            mine = model.denoiser()(x, sigma.expand(3), None)
        expected = {
            "epsilon": x - sigma * out_,
            "v_prediction": abar[t].sqrt() * z - (1 - abar[t]).sqrt() * out_,
            "sample": out_,
        }[prediction_type]
        assert (mine - expected).abs().max() <= 1e-5, (t, float((mine - expected).abs().max()))
        assert not torch.allclose(mine, x)  # the network does something: the comparison is not vacuous


def test_ddim_reproduces_ddimscheduler(eps_teacher: tuple[Path, Path]) -> None:
    """lit_gen's 10-step DDIM (Euler in VE coordinates on the teacher's own timesteps) = DDIMScheduler's loop."""
    folder, out = eps_teacher
    model = load_model(out)
    reference = diffusers.UNet2DModel.from_pretrained(folder).eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder, clip_sample=False)
    sched.set_timesteps(10)
    sigmas = model.param.sigmas_uniform_t(10)
    assert model.param.ddim_timesteps(10) == sched.timesteps.tolist()
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x_ref = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x_ref = sched.step(reference(x_ref, t, return_dict=False)[0], t, x_ref).prev_sample
        x_lit = sample_ddim(model.denoiser(), z * (1 + sigmas[0].double() ** 2).sqrt().float(), sigmas)
    assert (x_lit - x_ref).abs().max() <= 1e-4
    # `lit-gen sample --sampler ddim` runs the same grid (its prior draw is σ_max·n instead of √(1 + σ_max²)·n).
    drawn = model.sample(2, steps=10, sampler="ddim", seed=0, raw=True)
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again = sample_ddim(model.denoiser(), z0 * sigmas[0], sigmas)
    torch.testing.assert_close(drawn, again)


@pytest.mark.parametrize("make", [make_dit, make_cond_unet, lambda p: make_unet(p, num_class_embeds=3)])
def test_class_conditional_models_import_faithfully(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    """DiT (pipeline folder, learned σ, cosine β), UNet2DConditionModel with class labels (v, scaled_linear,
    steps_offset 1, scheduler beside the model), class-conditional UNet2DModel: --check is faithful."""
    src = make(tmp_path / "src")
    out = tmp_path / "t.safetensors"
    report = run_import(src, out, check=True)
    check = json.loads(Path(str(out) + ".check.json").read_text())
    assert check["faithful"] and check["denoiser_max_abs_fp64"] < 1e-10 and check["ddim_max_abs_fp64"] < 1e-10
    assert check["parameters_lit_gen"] == check["parameters_source"] == report["parameters"]
    assert Path(str(out) + ".samples.png").is_file()
    model = load_model(out)
    assert model.num_classes in (3, 4, 5)
    samples = model.sample(2, steps=3, sampler="ddim", label=1)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()


def test_edm_view_is_the_same_denoiser(eps_teacher: tuple[Path, Path], tmp_path: Path) -> None:
    """``--param edm``: EDM's c_skip x + c_out F with F = EDMView(the diffusers net) is the native denoiser."""
    folder, native_file = eps_teacher
    out = tmp_path / "edm.safetensors"
    run_import(folder, out, param="edm")
    native, view = load_model(native_file), load_model(out)
    assert type(view.param).__name__ == "EDM" and view.param.sigma_max == native.param.sigma_max
    native.net.double()
    view.net.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) * 3
    for sigma in (0.02, 0.7, 3.0, 150.0):
        s = torch.full((2,), sigma, dtype=torch.float64)
        with torch.no_grad():
            assert (view.denoiser()(x, s, None) - native.denoiser()(x, s, None)).abs().max() <= 1e-9


def test_cli_import_then_sample(eps_teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = eps_teacher
    out = tmp_path / "cli.safetensors"
    run_cli("import", folder, "--out", out, "--check")
    text = capsys.readouterr().out
    assert "UNet2DModel" in text and '"faithful": true' in text
    run_cli("sample", "--ckpt", out, "--n", 4, "--steps", 4, "--out", tmp_path / "s.npy")
    assert np.load(tmp_path / "s.npy").shape == (4, 3, 8, 8)


def _one_line_error(capsys: pytest.CaptureFixture, *args: object) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-gen: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line(eps_teacher: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = eps_teacher
    out = tmp_path / "o.safetensors"
    (tmp_path / "empty").mkdir()
    empty = _one_line_error(capsys, "import", tmp_path / "empty", "--out", out)
    assert "not a diffusers pipeline or model folder" in empty
    assert "unknown --format" in _one_line_error(capsys, "import", folder, "--out", out, "--format", "ckpt")
    no_sched = tmp_path / "no_sched"
    no_sched.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (no_sched / name).write_bytes((folder / name).read_bytes())
    assert "no scheduler config" in _one_line_error(capsys, "import", no_sched, "--out", out)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        (truncated / name).write_bytes((folder / name).read_bytes())
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "truncated" in _one_line_error(capsys, "import", truncated, "--out", out)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 48]}))
    for name in ("scheduler_config.json", "diffusion_pytorch_model.safetensors"):
        (wrong / name).write_bytes((folder / name).read_bytes())
    assert "shape mismatch" in _one_line_error(capsys, "import", wrong, "--out", out)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    assert "is not a state dict" in _one_line_error(capsys, "import", not_state, "--out", out)
    assert "EDM2" in _one_line_error(capsys, "import", not_state, "--out", out, "--format", "edm2")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tract", "cd", "fdistill"])
def test_distill_the_imported_teacher(eps_teacher: tuple[Path, Path], tmp_path: Path, recipe: str) -> None:
    """TRACT, CD and f-distill each train a few steps from the imported diffusers teacher and sample (and eval)."""
    folder, teacher = eps_teacher
    if recipe == "cd":  # consistency distillation needs EDM's F: the same teacher behind EDM preconditioning
        teacher = tmp_path / "edm_view.safetensors"
        run_import(folder, teacher, param="edm")
    images = (np.random.default_rng(0).random((64, 8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_cli("shards", tmp_path / "images.npy", "--out", tmp_path / "shards", "--no-progress")
    extra = {
        "tract": ["--model.init_args.schedule", "[4, 1]", "--model.init_args.steps_per_phase", "4"],
        "cd": ["--model.init_args.num_scales", "4"],
        "fdistill": [],
    }[recipe]
    root = tmp_path / "run"
    run_cli(
        "fit", "-c", REPO / f"recipes/digits/{recipe}.yaml", "--model.init_args.teacher", teacher,
        "--data.init_args.shards", tmp_path / "shards", "--data.init_args.batch_size", 8,
        "--trainer.default_root_dir", root, "--trainer.max_steps", 4, "--trainer.enable_progress_bar", "false",
        *extra,
    )  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    student = load_model(ckpt)
    assert student.description["method"] != "import"
    run_cli("sample", "--ckpt", ckpt, "--n", 4, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()
    run_cli("eval", "--ckpt", ckpt, "--ref", tmp_path / "shards", "--n", 16, "--metric", "fd_raw")
