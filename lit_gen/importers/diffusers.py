"""Import a diffusers teacher: a pipeline folder (``model_index.json``) or a model folder plus its scheduler config.

The network stays diffusers' own class (``nets.diffusers_adapter.DiffusersNet``: ``UNet2DModel``,
``UNet2DConditionModel`` with class labels, ``DiTTransformer2DModel``), its ``config.json`` becomes the network
description and its weights are read with safetensors (or, for an old ``.bin``, ``errors.load_torch_file``:
weights only, never pickled code). The scheduler config (``DDPMScheduler``/``DDIMScheduler`` and friends: the β
schedule, ``num_train_timesteps``, ``prediction_type``, ``timestep_spacing``, ``steps_offset``) becomes a
``diffusion.discrete.DiscreteVP`` parameterisation: the teacher's own ᾱ table.

``conformance`` is the proof that the import is faithful: the imported file, read back with ``export.load_model``,
against diffusers' module loaded by diffusers' own ``from_pretrained`` and diffusers' own ``DDIMScheduler``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lit_gen.diffusion.discrete import BETA_SCHEDULES, DiscreteVP
from lit_gen.errors import LitGenError, load_torch_file
from lit_gen.importers import count_parameters, load_weights, pixel_data_info, write_teacher
from lit_gen.nets.diffusers_adapter import MODEL_CLASSES, DiffusersNet, class_count

MODEL_COMPONENTS = ("unet", "transformer")  # where a pipeline keeps its denoiser
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SHARDED_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DENOISER_TOL = 1e-5  # float64 max |D_lit − x̂_ref| for a faithful import (the bound)
DDIM_TOL = 1e-4  # float64 max |x_lit − x_ref| after the DDIM loop
VAE_TOL = 1e-3  # float32 max |pixels_lit − pixels_ref| of the carried VAE's decode, in 0..255 units
UNSUPPORTED_SCHEDULER_KEYS = {
    "trained_betas": "a hand-given β table",
    "rescale_betas_zero_snr": "zero terminal SNR (ᾱ_T = 0 is σ = ∞ in VE coordinates)",
}


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise LitGenError(f"{what} {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise LitGenError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(value, dict):
        raise LitGenError(f"{what} {path} does not hold a JSON object")
    return value


def find_parts(src: str | Path) -> tuple[Path, Path, Path | None]:
    """(model folder, scheduler config file, VAE folder or None) of a pipeline or a model folder."""
    src = Path(src)
    if not src.is_dir():
        raise LitGenError(f"{src} is not a folder; a diffusers teacher is a pipeline or a model folder")
    if (src / "model_index.json").is_file():
        index = read_json(src / "model_index.json", "pipeline index")
        names = [c for c in MODEL_COMPONENTS if c in index]
        if not names:
            raise LitGenError(f"{src}/model_index.json names no denoiser component ({' or '.join(MODEL_COMPONENTS)})")
        model_dir = src / names[0]
        scheduler = src / "scheduler" / "scheduler_config.json"
        vae = src / "vae" if "vae" in index and (src / "vae").is_dir() else None
    elif (src / "config.json").is_file():
        model_dir = src
        candidates = [src / "scheduler_config.json", src / "scheduler" / "scheduler_config.json"]
        candidates.append(src.parent / "scheduler" / "scheduler_config.json")
        scheduler = next((c for c in candidates if c.is_file()), candidates[0])
        vae = None
    elif (src / "scheduler_config.json").is_file():
        raise LitGenError(f"{src} holds only a scheduler config, no model (config.json)")
    else:
        raise LitGenError(f"{src} is not a diffusers pipeline or model folder (no model_index.json or config.json)")
    if not (model_dir / "config.json").is_file():
        raise LitGenError(f"{model_dir} has no config.json (the model's architecture)")
    if not scheduler.is_file():
        raise LitGenError(
            f"{src}: no scheduler config (scheduler/scheduler_config.json or scheduler_config.json beside the model); "
            "the teacher's noise table comes from it"
        )
    return model_dir, scheduler, vae


def read_model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model folder: one safetensors file, a sharded one, or a ``.bin`` (read with
    ``load_torch_file``: weights only)."""
    if (model_dir / SHARDED_INDEX).is_file():
        index = read_json(model_dir / SHARDED_INDEX, "weight index")
        files = sorted(set((index.get("weight_map") or {}).values()))
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(_read_safetensors(model_dir / name))
        return tensors
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            return _read_safetensors(path)
        state = load_torch_file(path, f"weights {path}")
        return state_dict_of(state, path)
    raise LitGenError(f"{model_dir} has no weights ({' or '.join(WEIGHT_FILES)})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise LitGenError(f"weights {path} do not exist") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise LitGenError(f"cannot read {path} (truncated or not a safetensors file?): {err}") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` if it is a state dict (a mapping of names to tensors), else a one-line error."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise LitGenError(f"{path} is not a state dict (a {kind} instead of a mapping of parameter names to tensors)")
    return obj


def scheduler_param(config: dict[str, Any], where: Path, latent: bool = False) -> DiscreteVP:
    """The ``DiscreteVP`` of a diffusers scheduler config (``DDPMScheduler``/``DDIMScheduler`` keys). Latents
    (× the VAE's scaling_factor) have unit variance by design, so their σ_data is 1; pixels in [-1, 1] have 0.5."""
    for key, why in UNSUPPORTED_SCHEDULER_KEYS.items():
        if config.get(key):
            raise LitGenError(f"{where}: {key} ({why}) is not supported by lit_gen's discrete VP parameterisation")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise LitGenError(f"{where}: beta_schedule {schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    return DiscreteVP(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_schedule=schedule,
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        prediction_type=config.get("prediction_type", "epsilon"),
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
        sigma_data=1.0 if latent else 0.5,
    )


def build_net(model_dir: Path) -> tuple[DiffusersNet, dict[str, Any]]:
    """The adapter around the diffusers class of ``model_dir/config.json``, with the folder's weights loaded."""
    config = read_json(model_dir / "config.json", "model config")
    name = config.get("_class_name")
    if name not in MODEL_CLASSES:
        raise LitGenError(f"{model_dir}/config.json describes a {name!r}; lit_gen imports {', '.join(MODEL_CLASSES)}")
    num_classes, _ = class_count(name, config)  # refuses a conditioning lit_gen cannot feed, before building
    try:
        net = DiffusersNet(name, config, num_classes)
    except LitGenError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers rejects bad configs with many exception types
        raise LitGenError(f"{model_dir}/config.json: diffusers cannot build {name} from it: {err}") from None
    tensors = read_model_weights(model_dir)
    load_weights(net, {f"model.{k}": v for k, v in tensors.items()}, str(model_dir))
    return net.eval().requires_grad_(False), config


PARAM_VIEWS: dict[str, str] = {
    "native": "the teacher's own DiscreteVP table (network sees its own timesteps; DDIM reproduces diffusers)",
    "edm": "the same denoiser behind EDM preconditioning (nets.edm_view.EDMView), for methods that need EDM's F "
    "(consistency distillation)",
}


def import_diffusers(src: str | Path, out: str | Path, param_view: str = "native") -> dict[str, Any]:
    """Import the diffusers teacher at ``src`` into ``out`` (.safetensors); returns a short report.

    ``param_view`` "native" writes (DiffusersNet, DiscreteVP); "edm" writes (EDMView(DiffusersNet, DiscreteVP),
    EDM with σ_d = 0.5 (1 for latents) and the table's σ range): the same D(x; σ), seen as EDM's c_skip x + c_out F.
    A pipeline with a ``vae/`` (``AutoencoderKL``) is a latent teacher: its data is ``kind: "latent"`` and the
    VAE's tensors travel in the same file (``lit_gen.latents``)."""
    if param_view not in PARAM_VIEWS:
        raise LitGenError(f"unknown --param {param_view!r}; choose one of {', '.join(PARAM_VIEWS)}")
    start = time.perf_counter()
    model_dir, scheduler_file, vae_dir = find_parts(src)
    vae = read_vae(vae_dir) if vae_dir is not None else None
    param = scheduler_param(read_json(scheduler_file, "scheduler config"), scheduler_file, latent=vae is not None)
    net, config = build_net(model_dir)
    resolution = config.get("sample_size") or 0
    resolution = resolution[0] if isinstance(resolution, list) else resolution
    if not resolution:
        raise LitGenError(f"{model_dir}/config.json has no sample_size (the image resolution)")
    source = {"format": "diffusers", "path": str(src), "class": net.model_class, "scheduler": str(scheduler_file)}
    return finish_import(out, net, param, int(resolution), source, vae, param_view, start)


def read_vae(vae_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a latent pipeline's ``vae/`` (an ``AutoencoderKL``), checked by building it."""
    from lit_gen.latents import build_vae, vae_config

    config = vae_config(read_json(vae_dir / "config.json", "VAE config"), str(vae_dir))
    tensors = read_model_weights(vae_dir)
    build_vae(config, tensors, str(vae_dir))  # shapes and keys checked now, not when the first sample decodes
    return config, tensors


def finish_import(
    out: str | Path,
    net: DiffusersNet,
    param: DiscreteVP,
    resolution: int,
    source: dict[str, Any],
    vae: tuple[dict[str, Any], dict[str, torch.Tensor]] | None,
    param_view: str,
    start: float,
) -> dict[str, Any]:
    """Write the teacher: pixel data, or latent data carrying the VAE (``lit_gen.latents``); the ``--param`` view."""
    extra = None
    if vae is None:
        data = pixel_data_info(net.in_channels, resolution, net.num_classes)
    else:
        from lit_gen.latents import VAE_PREFIX, downsample_factor, latent_info, vae_record

        config, tensors = vae
        if int(config.get("latent_channels", 4)) != net.in_channels:
            raise LitGenError(
                f"the VAE makes {config.get('latent_channels')}-channel latents but the denoiser takes "
                f"{net.in_channels} channels"
            )
        side = resolution * downsample_factor(config)
        record = vae_record(config, tensors, None, [int(config.get("in_channels", 3)), side, side], "sample")
        data = latent_info(record, [net.in_channels, resolution, resolution], net.num_classes)
        extra = {VAE_PREFIX + k: v for k, v in tensors.items()}
    sampling = {"sampler": "ddim", "steps": 50}
    model_class = net.model_class
    if param_view == "edm":
        from lit_gen.diffusion.edm import EDM
        from lit_gen.nets.edm_view import EDMView
        from lit_gen.spec import describe

        view = EDMView(describe(net), describe(param), sigma_data=param.sigma_data, num_classes=net.num_classes)
        view.inner.load_state_dict(net.state_dict())
        edm = EDM(sigma_data=param.sigma_data, sigma_min=param.sigma_min, sigma_max=param.sigma_max)
        net, param = view.eval().requires_grad_(False), edm
        sampling = {"sampler": "heun", "steps": 18}
    write_teacher(out, net, param, data, source, sampling, extra)
    return {
        "out": str(out),
        "model_class": model_class,
        "parameters": count_parameters(net),
        "param": repr(param),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ------------------------------------------------------------------------------------------------ conformance
def _reference_x0(
    model: Any, sched: Any, z: torch.Tensor, t: int, labels: Any, in_channels: int, alphas: torch.Tensor
) -> torch.Tensor:
    """x̂ at integer timestep t computed the way diffusers' DDIMScheduler.step does (its ᾱ table and formulas)."""
    out = model(z, torch.full((z.shape[0],), t), class_labels=labels, return_dict=False)[0][:, :in_channels]
    a = alphas[t]
    b = 1 - a
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return (z - b**0.5 * out) / a**0.5
    if kind == "v_prediction":
        return a**0.5 * z - b**0.5 * out
    return out


def _call_kwargs(model_class: str) -> dict[str, Any]:
    return {"encoder_hidden_states": None} if model_class == "UNet2DConditionModel" else {}


@torch.no_grad()
def conformance(out: str | Path, src: str | Path, batch: int = 4, ddim_steps: int = 10, seed: int = 0) -> dict:
    """The imported teacher (read back from ``out``) against diffusers' module and DDIMScheduler on fixed inputs.

    In float64 (``*_fp64``, the algebra: any mistake shows far above round-off) and float32 (``*_fp32``, what runs;
    near σ_max ≈ 157 both sides lose ~1e-5 to cancellation in x̂ = x − σ ε̂):
    - ``denoiser_max_abs``: max |D_lit(x, σ_i) − x̂_ref| over timesteps 0, T/4, T/2, 3T/4, T−1, with
      x = y + σ_i n and x̂_ref = the x̂ of ``DDIMScheduler.step``'s formula at z = √ᾱ_i x (the VP state);
    - ``ddim_max_abs``: max |x_lit − x_ref| after ``ddim_steps`` steps from the same noise, lit_gen's ``ddim``
      sampler on ``DiscreteVP.sigmas_uniform_t`` against DDIMScheduler's loop (η = 0, no clipping);
    - parameter counts of both modules.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils import logging as diffusers_logging

    from lit_gen.export import load_model
    from lit_gen.nets.diffusers_adapter import diffusers_class

    diffusers_logging.set_verbosity_error()  # its advice to install accelerate / dtype notes are not our report

    model_dir, scheduler_file, vae_dir = find_parts(src)
    loaded = load_model(out)
    net: DiffusersNet = getattr(loaded.net, "inner", loaded.net)  # type: ignore[assignment]
    discrete: DiscreteVP = getattr(loaded.net, "inner_param", loaded.param)
    reference = diffusers_class(net.model_class).from_pretrained(str(model_dir)).eval()
    sched_cfg = read_json(scheduler_file, "scheduler config")
    sched = DDIMScheduler.from_config(sched_cfg, clip_sample=False, thresholding=False, set_alpha_to_one=True)
    report: dict[str, Any] = {
        "parameters_lit_gen": count_parameters(net),
        "parameters_source": count_parameters(reference),
        "prediction_type": discrete.prediction_type,
        "beta_schedule": discrete.beta_schedule,
        "param": type(loaded.param).__name__,
        "ddim_steps": ddim_steps,
    }
    table = sched.alphas_cumprod.clone()
    for dtype, tag in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        loaded.net.to(dtype)
        reference.to(dtype)
        sched.alphas_cumprod = table.to(dtype)  # the same float32 table, held in the compared dtype
        den, ddim = _compare(loaded, net, discrete, reference, sched, batch, ddim_steps, seed, dtype)
        report[f"denoiser_max_abs_{tag}"] = den
        report[f"ddim_max_abs_{tag}"] = ddim
    loaded.net.to(torch.float32)
    vae_ok = True
    if vae_dir is not None:  # the carried VAE, read back from the file, against diffusers' from_pretrained decode
        report["vae_decode_max_abs_fp32"] = _compare_vae(loaded.data_info, vae_dir, batch, seed)
        vae_ok = report["vae_decode_max_abs_fp32"] <= VAE_TOL
    report["faithful"] = bool(
        vae_ok
        and report["denoiser_max_abs_fp64"] <= DENOISER_TOL
        and report["ddim_max_abs_fp64"] <= DDIM_TOL
        and report["parameters_lit_gen"] == report["parameters_source"]
    )
    return report


def _compare(
    loaded: Any, net: Any, param: DiscreteVP, reference: Any, sched: Any, batch: int, steps: int, seed: int, dtype: Any
) -> tuple[float, float]:
    """(max |D_lit − x̂_ref| over five table timesteps, max |x_lit − x_ref| after the DDIM loop) in ``dtype``."""
    from lit_gen.diffusion.samplers import sample_ddim

    kwargs = _call_kwargs(net.model_class)

    def ref_model(z: torch.Tensor, t: torch.Tensor, class_labels: Any = None, return_dict: bool = False) -> Any:
        return reference(z, t, class_labels=class_labels, return_dict=return_dict, **kwargs)

    generator = torch.Generator().manual_seed(seed)
    shape = [batch, *loaded.data_info["shape"]]
    labels = torch.randint(0, net.num_classes, (batch,), generator=generator) if net.num_classes else None
    denoiser = loaded.denoiser()
    y = (torch.rand(shape, generator=generator) * 2 - 1).to(dtype)
    n = torch.randn(shape, generator=generator).to(dtype)
    alphas = sched.alphas_cumprod.to(dtype)
    T = param.num_train_timesteps
    worst = 0.0
    for t in sorted({0, T // 4, T // 2, 3 * T // 4, T - 1}):
        sigma = param.sigmas[t].to(dtype)
        x = y + sigma * n
        mine = denoiser(x, sigma.expand(batch), labels)
        ref = _reference_x0(ref_model, sched, x * alphas[t] ** 0.5, t, labels, net.in_channels, alphas)
        worst = max(worst, float((mine - ref).abs().max()))
    sched.set_timesteps(steps)
    z = torch.randn(shape, generator=generator).to(dtype)
    x_ref = z.clone()
    for t in sched.timesteps:
        model_out = ref_model(x_ref, t.expand(batch), class_labels=labels)[0][:, : net.in_channels]
        x_ref = sched.step(model_out, t, x_ref, eta=0.0).prev_sample
    sigmas = param.sigmas_uniform_t(steps, dtype=dtype)
    x_lit = sample_ddim(denoiser, z * (1 + sigmas[0] ** 2).sqrt(), sigmas, labels)
    return worst, float((x_lit - x_ref).abs().max())


def _compare_vae(info: dict[str, Any], vae_dir: Path, batch: int, seed: int) -> float:
    """max |decode_lit(z) − decode_ref(z)| in 0..255 pixel units, float32: lit_gen's decode of the VAE carried in
    the teacher file against diffusers' ``AutoencoderKL.from_pretrained(vae/).decode(z / scale + shift)``."""
    from diffusers import AutoencoderKL

    from lit_gen.latents import decode_latents

    record = info["vae"]
    reference = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    z = torch.randn(batch, *info["shape"], generator=torch.Generator().manual_seed(seed + 1))
    expected = reference.decode(z / record["scaling_factor"] + record["shift_factor"]).sample
    expected = (expected.clamp(-1, 1) + 1) * 127.5
    return float((decode_latents(z, info) - expected).abs().max())
