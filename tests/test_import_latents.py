"""Latent teachers end to end: a tiny diffusers pipeline (AutoencoderKL + DiTTransformer2DModel, random weights,
save_pretrained; nothing downloaded) imports with its VAE carried, `lit-gen shards --encode` writes VAE latents
(× scaling_factor), a student trains on them, and `lit-gen sample` / `lit-gen export` decode to PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_gen.data.info import read_info
from lit_gen.export import load_model
from lit_gen.importers.command import run_import
from lit_gen.latents import VAE_PREFIX, decode_latents, fingerprint
from tests.conftest import REPO, run_cli

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

IMAGE = 16  # pixels; the tiny VAE downsamples by 2 -> 4x8x8 latents


def _randomise(model: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def make_vae() -> diffusers.AutoencoderKL:
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE, scaling_factor=0.5,
    )  # fmt: skip
    _randomise(vae)
    return vae


def make_latent_pipeline(folder: Path, num_classes: int = 10) -> Path:
    """model_index.json, vae/ (AutoencoderKL), transformer/ (DiT, learned σ, 4 latent channels), scheduler/."""
    make_vae().save_pretrained(folder / "vae")
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=IMAGE // 2, patch_size=2, num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero",
    )  # fmt: skip
    _randomise(dit)
    dit.save_pretrained(folder / "transformer")
    diffusers.DDIMScheduler(beta_schedule="linear").save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = make_latent_pipeline(tmp_path_factory.mktemp("dit_latent") / "pipe")
    out = folder.parent / "teacher.safetensors"
    run_import(folder, out)
    return folder, out


def test_latent_pipeline_imports_and_carries_its_vae(latent_teacher: tuple[Path, Path]) -> None:
    """The teacher describes latent data (4x8x8, VAE fingerprint, scaling), carries the VAE's tensors, and decodes
    exactly as diffusers' own AutoencoderKL.decode(z / scaling_factor)."""
    folder, out = latent_teacher
    model = load_model(out)
    info = model.data_info
    assert info["kind"] == "latent" and info["shape"] == [4, 8, 8] and info["num_classes"] == 10
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    assert info["vae"]["fingerprint"] == fingerprint(vae.state_dict())
    assert info["vae"]["scaling_factor"] == 0.5 and info["vae"]["image_shape"] == [3, IMAGE, IMAGE]
    assert info["vae"]["path"] == str(out.resolve())  # carried: the file's own path, filled in when loaded
    assert model.param.sigma_data == 1.0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        assert sum(k.startswith(VAE_PREFIX) for k in handle.keys()) == len(vae.state_dict())
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((vae.decode(z / 0.5).sample.clamp(-1, 1) + 1) * 127.5).float()
    assert (decode_latents(z, info) - expected).abs().max() <= 1e-4
    pixels = model.sample(2, steps=3, sampler="ddim")
    assert pixels.shape == (2, 3, IMAGE, IMAGE) and 0 <= pixels.min() and pixels.max() <= 255
    assert model.sample(2, steps=3, sampler="ddim", raw=True).shape == (2, 4, 8, 8)


def test_check_reports_the_vae(latent_teacher: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = latent_teacher
    report = run_import(folder, tmp_path / "t.safetensors", check=True)["check"]
    assert report["faithful"] and report["vae_decode_max_abs_fp32"] <= 1e-4
    assert report["denoiser_max_abs_fp64"] <= 1e-5 and Path(report["samples"]).is_file()


def test_encode_shards_and_bad_inputs(latent_teacher: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`lit-gen shards builtin:digits --image-size 16 --encode VAE`: latents = (E(x) − shift)·scale, recorded in
    dataset.json; the teacher file encodes the same latents; a folder that is no AutoencoderKL is one line."""
    folder, teacher = latent_teacher
    run_cli(
        "shards", "builtin:digits", "--out", tmp_path / "lat", "--image-size", IMAGE, "--encode", folder / "vae",
        "--encode-mode", "mean", "--no-progress", "--shard-size", 1000,
    )  # fmt: skip
    info = read_info(tmp_path / "lat")
    assert info["kind"] == "latent" and info["shape"] == [4, 8, 8] and info["num_classes"] == 10
    assert info["vae"]["path"] == str((folder / "vae").resolve()) and info["vae"]["encode"] == "mean"
    assert info["vae"]["fingerprint"] == load_model(teacher).data_info["vae"]["fingerprint"]
    from lit_gen.eval.reference import read_reference

    latents, labels, _ = read_reference(tmp_path / "lat", 4)
    run_cli("shards", "builtin:digits", "--out", tmp_path / "px", "--image-size", IMAGE, "--no-progress")
    pixels, labels_px, _ = read_reference(tmp_path / "px", 4)
    assert torch.equal(labels, labels_px)  # the same write order
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        x = (pixels.float() / 127.5 - 1).expand(-1, 3, -1, -1)  # gray digits -> the VAE's 3 channels
        expected = vae.encode(x).latent_dist.mean * 0.5
    assert (latents - expected).abs().max() <= 1e-5
    # the teacher file carries the same VAE: --encode with it gives the same latents; "sample" draws differ by seed
    run_cli(
        "shards", "builtin:digits", "--out", tmp_path / "lat2", "--image-size", IMAGE, "--encode", teacher,
        "--encode-mode", "mean", "--no-progress",
    )  # fmt: skip
    assert torch.equal(read_reference(tmp_path / "lat2", 4)[0], latents)
    from tests.test_import_diffusers import _one_line_error

    bad = tmp_path / "x"
    err = _one_line_error(capsys, "shards", "builtin:digits", "--out", bad, "--encode", folder / "transformer")
    assert "is no AutoencoderKL" in err
    err = _one_line_error(capsys, "shards", "builtin:toy2d:gmm8:100", "--out", bad, "--encode", folder / "vae")
    assert "--encode turns images" in err
    info_file = tmp_path / "lat" / "dataset.json"
    broken = json.loads(info_file.read_text())
    del broken["vae"]["fingerprint"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="vae record lacks fingerprint"):
        read_info(tmp_path / "broken")


def _fit_error(capsys, *args: object) -> str:  # type: ignore[no-untyped-def]
    """The one error line of a `lit-gen fit` (Lightning's own INFO lines may come before it)."""
    with pytest.raises(SystemExit):
        run_cli(*args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lit-gen: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_student_trains_on_latents_and_decodes(latent_teacher: tuple[Path, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """TRACT trains a few steps from the latent teacher on latent shards; `lit-gen sample` and `lit-gen export`
    of the student decode to PNG; pixel shards, or latents of another VAE, are refused in one line."""
    folder, teacher = latent_teacher
    run_cli(
        "shards", "builtin:digits", "--out", tmp_path / "lat", "--image-size", IMAGE, "--encode", teacher,
        "--no-progress",
    )  # fmt: skip
    root = tmp_path / "run"
    fit = [
        "fit", "-c", REPO / "recipes/digits/tract.yaml", "--model.init_args.teacher", teacher,
        "--data.init_args.batch_size", 8, "--trainer.default_root_dir", root, "--trainer.max_steps", 3,
        "--trainer.enable_progress_bar", "false", "--model.init_args.schedule", "[4, 1]",
        "--model.init_args.steps_per_phase", 3,
    ]  # fmt: skip
    run_cli(*fit, "--data.init_args.shards", tmp_path / "lat")
    ckpt = root / "checkpoints" / "last.ckpt"
    student = load_model(ckpt)
    assert student.data_info["kind"] == "latent" and student.data_info["vae"]["path"] == str(teacher.resolve())
    run_cli("sample", "--ckpt", ckpt, "--n", 4, "--out", tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").mode == "RGB"
    run_cli("export", "--ckpt", ckpt, "--out", tmp_path / "student.safetensors")
    run_cli("sample", "--ckpt", tmp_path / "student.safetensors", "--n", 4, "--out", tmp_path / "e.npy")
    assert np.load(tmp_path / "e.npy").shape == (4, 3, IMAGE, IMAGE)
    run_cli("eval", "--ckpt", ckpt, "--ref", tmp_path / "lat", "--n", 16, "--metric", "fd")  # latent FD
    from lit_gen.data.builtin import load_digits

    rgb = np.repeat(load_digits()[0], 3, axis=1)  # the same digits as RGB: the VAE's image shape
    np.save(tmp_path / "rgb.npy", rgb)
    run_cli("shards", tmp_path / "rgb.npy", "--out", tmp_path / "px", "--image-size", IMAGE, "--no-progress")
    run_cli("eval", "--ckpt", ckpt, "--ref", tmp_path / "px", "--n", 16, "--metric", "fd_raw")  # on decoded pixels
    capsys.readouterr()
    err = _fit_error(capsys, *fit, "--data.init_args.shards", tmp_path / "px")
    assert "was trained on latent [4, 8, 8]" in err and "--encode" in err
    other = tmp_path / "other_vae"
    vae = make_vae()
    _randomise(vae, 0.1)
    vae.save_pretrained(other)
    run_cli("shards", "builtin:digits", "--out", tmp_path / "lat_other", "--image-size", IMAGE, "--encode", other)
    err = _fit_error(capsys, *fit, "--data.init_args.shards", tmp_path / "lat_other")
    assert "another VAE" in err


@pytest.mark.slow
def test_fdistill_on_latents(latent_teacher: tuple[Path, Path], tmp_path: Path) -> None:
    """f-distill (JS, discriminator head on the DiT's last-block tokens) trains a few steps on latent shards and its
    one-step student decodes to PNG."""
    _, teacher = latent_teacher
    run_cli(
        "shards", "builtin:digits", "--out", tmp_path / "lat", "--image-size", IMAGE, "--encode", teacher,
        "--no-progress",
    )  # fmt: skip
    root = tmp_path / "run"
    run_cli(
        "fit", "-c", REPO / "recipes/digits/fdistill.yaml", "--model.init_args.teacher", teacher,
        "--data.init_args.shards", tmp_path / "lat", "--data.init_args.batch_size", 8,
        "--trainer.default_root_dir", root, "--trainer.max_steps", 3, "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    run_cli("sample", "--ckpt", root / "checkpoints" / "last.ckpt", "--n", 4, "--out", tmp_path / "f.png")
    assert Image.open(tmp_path / "f.png").mode == "RGB"


def test_check_compatible_kinds_and_vaes() -> None:
    """Latent data of another VAE (fingerprint) or scaling, or pixels, do not pass for a latent model's data."""
    from lit_gen.data.info import check_compatible
    from lit_gen.errors import LitGenError
    from lit_gen.latents import latent_info

    record = {"fingerprint": "ab" * 32, "scaling_factor": 0.18215, "shift_factor": 0.0}
    mine = latent_info(record, [4, 8, 8], 0)
    check_compatible(mine, latent_info(dict(record), [4, 8, 8], 0), "m")
    check_compatible(mine, {"shape": [4, 8, 8]}, "m")  # a partial description: nothing to compare
    for other in ({**record, "fingerprint": "cd" * 32}, {**record, "scaling_factor": 0.13025}):
        with pytest.raises(LitGenError, match="another VAE"):
            check_compatible(mine, latent_info(other, [4, 8, 8], 0), "m")
    with pytest.raises(LitGenError, match="m was trained on latent .* but the shards hold image"):
        check_compatible(mine, {"kind": "image", "shape": [3, 16, 16]}, "m")
    with pytest.raises(LitGenError, match="source holds latent"):
        check_compatible(mine, latent_info({**record, "fingerprint": "0"}, [4, 8, 8], 0), "source", "holds")


def test_latent_teacher_exports_with_a_latent_guide(latent_teacher: tuple[Path, Path], tmp_path: Path) -> None:
    """`lit-gen export T --guide G` of two latent teachers: the file carries the VAE once and loads with its guide."""
    from lit_gen.export import export, load_model

    _, teacher = latent_teacher
    out = export(teacher, tmp_path / "guided.safetensors", guide=teacher)
    loaded = load_model(out)
    assert loaded.guide is not None
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        keys = list(handle.keys())
    assert not any(k.startswith("guide.vae.") for k in keys) and any(k.startswith("vae.") for k in keys)
    x = torch.randn(2, *loaded.description["data"]["shape"])
    sigma = torch.full((2,), 1.0)
    with torch.no_grad():  # the guide is the teacher itself here: the two denoisers agree
        torch.testing.assert_close(loaded.guide.denoiser()(x, sigma, None), loaded.denoiser()(x, sigma, None))
