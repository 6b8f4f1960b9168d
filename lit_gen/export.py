"""One student/teacher format: read a lit_gen checkpoint or exported file, rebuild the denoiser, sample from it.

Files:
- ``.ckpt`` written by ``lit-gen fit``: a Lightning checkpoint whose ``lit_gen`` section describes the network,
  parameterisation, data and sampling defaults (``GenerativeMethod.describe``). Read with ``weights_only=True``:
  loading never executes pickled code.
- ``.safetensors`` written by ``lit-gen export``: the weights (EMA by default) plus the same description as JSON in
  the file's metadata under ``lit_gen``.

Network and parameterisation classes are rebuilt by ``lit_gen.spec.build``, which imports only from ``lit_gen.``.

Guidance at sampling time: ``--guidance w`` is classifier-free guidance for a class-conditional teacher; autoguidance
(Karras et al. 2024) when the file carries a guiding model (``lit-gen export --guide BAD``: its weights under the
``guide.`` prefix, its description under ``guide``); and for a w-conditioned student (``guidance_range`` in the
description, Meng et al. 2023) w is fed to the network instead — inside the trained range unless
``allow_extrapolation``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lit_gen.data.info import to_output
from lit_gen.diffusion import SAMPLERS, AutoGuidanceDenoiser, CFGDenoiser, sample, schedule_from_grid
from lit_gen.diffusion.guidance import GuidanceBound
from lit_gen.errors import LitGenError, load_torch_file
from lit_gen.latents import VAE_PREFIX, split_carried_vae
from lit_gen.spec import build

NET_PREFIX = "net."
GUIDE_PREFIX = "guide."  # an exported teacher's guiding model (autoguidance), in the same safetensors file


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning ``.ckpt`` safely (``weights_only=True``) with a one-line error for every failure.

    A DeepSpeed checkpoint folder (what ``lit-gen fit`` writes under a DeepSpeed strategy) is read by
    ``lit_gen.scale.checkpoints`` into the same layout, its raw weights consolidated to fp32; an FSDP folder
    (``lit_gen.scale.fsdp``) likewise."""
    path = Path(path)
    if path.is_dir():
        from lit_gen.scale.checkpoints import is_deepspeed_checkpoint, read_deepspeed_checkpoint
        from lit_gen.scale.fsdp import is_fsdp_checkpoint, read_fsdp_checkpoint

        if is_fsdp_checkpoint(path):  # an FSDP (torch.distributed.checkpoint) folder, consolidated to fp32
            return read_fsdp_checkpoint(path)
        if not is_deepspeed_checkpoint(path):
            raise LitGenError(
                f"{path} is a folder but not a DeepSpeed or FSDP checkpoint (no 'latest' tag / model states / "
                "lit_gen_complete.json)"
            )
        return read_deepspeed_checkpoint(path)
    if not path.is_file():
        raise LitGenError(f"checkpoint {path} does not exist")
    checkpoint = load_torch_file(path, f"checkpoint {path}")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise LitGenError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if "lit_gen" not in checkpoint:
        raise LitGenError(f"{path} was not written by lit_gen (no 'lit_gen' section)")
    return checkpoint


def net_weights(state_dict: dict[str, torch.Tensor], prefix: str = NET_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors of the submodule at ``prefix`` (default: the trainable network), without the prefix."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_model_file(path: str | Path, weights: str = "ema") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(description, network weights) from a ``.ckpt`` or an exported ``.safetensors`` file.

    ``weights`` = "ema" (the averaged weights when the run kept an EMA, else the raw ones) or "raw".
    """
    if weights not in ("ema", "raw"):
        raise LitGenError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise LitGenError(f"model file {path} does not exist")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise LitGenError(f"cannot read {path} (truncated or not a safetensors file?): {err}") from None
        if "lit_gen" not in metadata:
            raise LitGenError(f"{path} has no lit_gen description in its metadata; export it with `lit-gen export`")
        description = json.loads(metadata["lit_gen"])
        if weights == "raw" and description.get("weights") != "raw":
            raise LitGenError(
                f"{path} holds {description.get('weights')} weights only; export again with --weights raw"
            )
        return description, tensors
    checkpoint = read_checkpoint(path)
    return _description_and_weights(checkpoint, weights)


def _description_and_weights(
    checkpoint: dict[str, Any], weights: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(description, network weights) of a checkpoint dict: EMA from ``ema_state_dict`` (``callbacks.ema.EMA``) or
    the method's own EMA submodule (``ema_prefix``), raw from ``state_dict``."""
    description = dict(checkpoint["lit_gen"])
    state = checkpoint["state_dict"]
    if "current_model_state" in checkpoint:  # written by Lightning's WeightAveraging: state_dict holds the average
        state = checkpoint["current_model_state"] if weights == "raw" else state
        description["weights"] = weights
        return description, net_weights(state)
    ema_prefix = description.get("ema_prefix")
    if ema_prefix:
        # The method keeps its own inference EMA of ``net`` as a submodule (TRACT's µ_I, a consistency model's EMA).
        description["weights"] = weights
        return description, net_weights(state, ema_prefix if weights == "ema" else NET_PREFIX)
    ema = checkpoint.get("ema_state_dict")
    if weights == "ema" and ema:
        description["weights"] = "ema"
        return description, {**net_weights(state), **net_weights(ema)}  # integer buffers are not averaged
    description["weights"] = "raw"
    return description, net_weights(state)


@dataclass
class LoadedModel:
    """A denoiser rebuilt from a file: network + parameterisation + data description + sampling defaults."""

    net: nn.Module
    param: Any
    description: dict[str, Any]
    guide: LoadedModel | None = None  # the guiding ("bad") model an exported teacher carries, for autoguidance

    @property
    def data_info(self) -> dict[str, Any]:
        return self.description["data"]

    @property
    def num_classes(self) -> int:
        return int(self.net.init_args.get("num_classes", 0) or 0)

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """(w_min, w_max) of a w-conditioned student (it takes w as an input), None for any other model."""
        value = self.description.get("guidance_range")
        return (float(value[0]), float(value[1])) if value else None

    def check_guidance(self, guidance: float | None, allow_extrapolation: bool = False) -> float:
        """The guidance weight to use (None = 1, or for a w-conditioned student 1 if it was trained there); one line
        for a w outside a w-conditioned student's trained range (unless ``allow_extrapolation``) or for guidance on
        a model that cannot be guided."""
        w_range = self.guidance_range
        if w_range is not None:
            lo, hi = w_range
            if guidance is None:
                if not lo <= 1.0 <= hi:
                    raise LitGenError(
                        f"this student is conditioned on the guidance weight, trained on w in [{lo:g}, {hi:g}]: "
                        "pass --guidance w"
                    )
                return 1.0
            if not lo <= guidance <= hi and not allow_extrapolation:
                raise LitGenError(
                    f"--guidance {guidance:g} is outside the w range this student was trained on [{lo:g}, {hi:g}]; "
                    "pick a w inside it or pass --allow-extrapolation"
                )
            return float(guidance)
        guidance = 1.0 if guidance is None else float(guidance)
        if guidance != 1.0 and self.guide is None and self.num_classes == 0:
            raise LitGenError(
                f"--guidance {guidance:g} needs a class-conditional model (classifier-free guidance), a "
                "w-conditioned student, or a teacher exported with its guiding model (--guide); this one has none"
            )
        return guidance

    def denoiser(self, guidance: float = 1.0, bad: LoadedModel | None = None) -> Any:
        """``D(x, sigma, label)``; with ``guidance != 1`` classifier-free guided (or autoguided by ``bad``, or by
        the guiding model the file carries); a w-conditioned student gets w as its input instead."""
        w_range = self.guidance_range

        def base(x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor | None, **kw: Any) -> torch.Tensor:
            net: Any = self.net
            if w_range is not None:  # Meng et al. 2023: the student takes w; no second (unconditional) call
                net = GuidanceBound(self.net, torch.full((x.shape[0],), float(guidance), device=x.device))
            return self.param.denoise(net, x, sigma, label, **kw)  # kw: MeanFlow's jump target r

        if self.guidance_range is not None:
            return base
        bad = bad if bad is not None else self.guide
        if bad is not None:
            return AutoGuidanceDenoiser(base, bad.denoiser(), guidance)
        if guidance == 1.0:
            return base
        if self.num_classes == 0:
            raise LitGenError("classifier-free guidance needs a class-conditional model; this one has no classes")
        return CFGDenoiser(base, guidance, null_label=self.num_classes)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        label: int | None = None,
        guidance: float | None = None,
        batch_size: int = 1024,
        device: str | torch.device = "cpu",
        raw: bool = False,
        allow_extrapolation: bool = False,
    ) -> torch.Tensor:
        """``n`` samples in the data's own units (uint8-range floats for images, original units for points).

        ``raw=True`` returns the model-space tensor instead. The same seed gives the same samples. ``guidance``
        (None = 1): see ``check_guidance``; a w-conditioned student outside its trained w range needs
        ``allow_extrapolation``.
        """
        defaults = self.description.get("sampling", {})
        steps = int(defaults.get("steps", 18) if steps is None else steps)  # 0 is refused below, not a default
        sampler = sampler or defaults.get("sampler", "heun")
        if sampler not in SAMPLERS:
            raise LitGenError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
        if steps < 1:
            raise LitGenError(f"--steps must be at least 1, got {steps}")
        if n < 1:
            raise LitGenError(f"--n must be at least 1, got {n}")
        if label is not None and not 0 <= label < max(self.num_classes, 1):
            raise LitGenError(f"--label {label} is out of range for a model with {self.num_classes} classes")
        if (sampler == "meanflow") != (getattr(self.param, "kind", "") == "meanflow"):
            raise LitGenError(
                "the meanflow sampler goes with MeanFlow models only (flow coordinates); this model is "
                f"{self.description.get('method', '?')}: use its own sampler"
                if sampler == "meanflow"
                else f"a MeanFlow model samples with the meanflow sampler, not {sampler!r}"
            )
        guidance = self.check_guidance(guidance, allow_extrapolation)
        if sampler == "meanflow" and guidance != 1.0:
            raise LitGenError("MeanFlow folds guidance into training (cfg_scale); sample it with --guidance 1")
        self.net.to(device).eval()
        shape = list(self.data_info["shape"])
        denoiser = self.denoiser(guidance)
        generator = torch.Generator(device=device).manual_seed(seed)
        sigmas = None
        if defaults.get("grid") is not None:
            # A student trained on fixed σ points (TRACT/BTD, consistency, one-step): its own K-step schedule.
            sigmas = schedule_from_grid(defaults["grid"], steps, exact=bool(defaults.get("grid_exact", True))).to(
                device
            )
        elif sampler == "ddim" and getattr(self.param, "kind", "") == "vp":
            sigmas = self.param.sigmas_uniform_t(steps).to(device)
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            labels = None
            if self.num_classes:
                labels = (
                    torch.full((b,), label, dtype=torch.long, device=device)
                    if label is not None
                    else torch.randint(0, self.num_classes, (b,), generator=generator, device=device)
                )
            x = sample(
                denoiser,
                [b, *shape],
                steps=steps,
                sampler=sampler,
                sigmas=sigmas,
                sigma_min=self.param.sigma_min,
                sigma_max=self.param.sigma_max,
                label=labels,
                generator=generator,
                device=device,
            )
            out.append(x.float().cpu())
        x = torch.cat(out)
        return x if raw else to_output(x, self.data_info, device)  # latents: decoded to pixels by their VAE


def usable_device(device: str) -> torch.device:
    """``--device`` checked before any work: a name torch does not know, or a device this machine lacks (``cuda``
    without a GPU), is one line instead of a traceback from deep inside torch."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LitGenError(f"--device {device} is not usable here: {reason[:200]}") from None
    return torch.device(device)


def load_model(path: str | Path, weights: str = "ema") -> LoadedModel:
    """Rebuild the denoiser from a ``.ckpt`` or exported ``.safetensors`` — the path is all it needs (a teacher
    exported with ``--guide`` brings its guiding model along, as ``LoadedModel.guide``)."""
    description, tensors = read_model_file(path, weights)
    tensors, description = split_carried_vae(tensors, description, path)  # a latent teacher's VAE stays aside
    guide = None
    if description.get("guide") is not None:
        guide_tensors = net_weights(tensors, GUIDE_PREFIX)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(GUIDE_PREFIX)}
        guide = _rebuild(description["guide"], guide_tensors, f"{path} (its guiding model)")
        description = {k: v for k, v in description.items() if k != "guide"}
    loaded = _rebuild(description, tensors, str(path))
    loaded.guide = guide
    return loaded


def _rebuild(description: dict[str, Any], tensors: dict[str, torch.Tensor], path: str) -> LoadedModel:
    """The network and parameterisation a description names, with ``tensors`` loaded (one line on a mismatch)."""
    try:
        net = build(description["net"])
        param = build(description["param"])
    except (KeyError, TypeError, ValueError) as err:
        raise LitGenError(f"{path}: cannot rebuild the model it describes: {err}") from None
    setting = description.get("lora")
    if setting is not None:  # a LoRA student: base + adapter tensors, merged below into a plain network
        from lit_gen.nets.lora import inject

        inject(net, setting)
    expected = net.state_dict()
    wrong = [(k, v.shape, expected[k].shape) for k, v in tensors.items() if k in expected]
    wrong = [(k, have, want) for k, have, want in wrong if have != want]
    if wrong:
        key, have, want = wrong[0]
        raise LitGenError(
            f"{path}: weights do not match the described network ({len(wrong)} tensor(s) of another shape, e.g. "
            f"{key}: {list(have)} in the file, {list(want)} in the network; written by another lit_gen version?)"
        )
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LitGenError(
            f"{path}: weights do not match the described network (missing {len(missing)}, unexpected "
            f"{len(unexpected)}, e.g. {(missing or unexpected)[0]})"
        )
    if setting is not None:
        from lit_gen.nets.lora import merge

        merge(net)
        description = {k: v for k, v in description.items() if k != "lora"}
    net.eval().requires_grad_(False)
    if description.get("data") is None:
        raise LitGenError(f"{path} has no data description (was it trained without `lit-gen shards` data?)")
    return LoadedModel(net=net, param=param, description=description)


def export(
    ckpt: str | Path,
    out: str | Path,
    weights: str = "ema",
    guide: str | Path | None = None,
    keep_adapters: bool = False,
) -> Path:
    """Write the network weights and their description to one self-describing safetensors file.

    A LoRA student (``lit_gen.nets.lora``) is merged, W ← W + (α/r) B A, into a plain student of its network class
    (loads and samples without peft); ``keep_adapters`` writes the base and the adapters apart instead, with the
    LoRA setting in the description (loading that file merges them).

    ``guide``: a guiding ("bad") model for autoguidance (Karras et al. 2024) to carry in the same file (weights under
    ``guide.``, description under ``guide``), so ``lit-gen sample --guidance w`` and distillation recipes need only
    this one path. It must model the same data (shape, classes)."""
    description, tensors = read_model_file(ckpt, weights)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LitGenError(f"--out must end in .safetensors, got {out}")
    if description.get("lora") is not None and not keep_adapters:
        setting = description["lora"]
        merged = _rebuild(description, tensors, str(ckpt))
        tensors = {k: v.detach() for k, v in merged.net.state_dict().items()}
        description = {**merged.description, "lora_merged": {k: setting[k] for k in ("rank", "alpha", "modules")}}
    if guide is not None:
        if description.get("guide") is not None:
            raise LitGenError(f"{ckpt} already carries a guiding model")
        guide_description, guide_tensors = read_model_file(guide, "ema")
        # A latent guiding model works in the teacher's latents: the teacher's file carries that VAE once (a second
        # copy under guide.vae.* would be refused on load); another VAE's latents cannot guide this teacher.
        guide_vae = (guide_description.get("data") or {}).get("vae")
        main_vae = (description.get("data") or {}).get("vae")
        if (guide_vae or main_vae) and (guide_vae or {}).get("fingerprint") != (main_vae or {}).get("fingerprint"):
            raise LitGenError(
                f"the guiding model {guide} works in other latents than {ckpt} (their VAEs differ); a guide must "
                "share the teacher's data space"
            )
        guide_tensors = {k: v for k, v in guide_tensors.items() if not k.startswith(VAE_PREFIX)}
        have_data, want_data = guide_description.get("data") or {}, description.get("data") or {}
        if list(have_data.get("shape", [])) != list(want_data.get("shape", [])):
            raise LitGenError(
                f"the guiding model {guide} was trained on data of shape {have_data.get('shape')} but {ckpt} on "
                f"{want_data.get('shape')}"
            )
        have, want = int(have_data.get("num_classes") or 0), int(want_data.get("num_classes") or 0)
        if have != want:
            raise LitGenError(f"the guiding model {guide} has {have} classes but {ckpt} has {want}")
        description = {**description, "guide": guide_description}
        tensors = {**tensors, **{GUIDE_PREFIX + k: v for k, v in guide_tensors.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"lit_gen": json.dumps(description)})
    tmp.replace(out)
    return out
