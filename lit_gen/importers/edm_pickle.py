"""Import an NVlabs EDM or EDM2 teacher (``network-snapshot-*.pkl``, EDM2's post-hoc EMA ``.pkl``) without running
the pickle.

EDM writes ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...))`` where ``net`` is an
``EDMPrecond`` wrapping a ``SongUNet``. Its classes are ``torch_utils.persistence`` persistent classes: each object
pickles as ``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name, state}``,
which would ``exec`` ``module_src`` to rebuild the class (Karras et al. 2022, code release). Here the pickle is read
by ``errors.load_restricted_pickle`` with a table of the only globals it may name, each mapped to an inert stand-in:
a persistent object becomes a ``PersistentRecord`` holding ``class_name`` and ``state`` (``module_src`` is kept as
text and never executed), a plain ``torch.nn`` container becomes a ``ModuleRecord``, tensors are rebuilt by torch's
own weights-only-safe rebuild functions, storages by ``load_torch_file`` (``weights_only=True``). Anything else
(``os.system``, ``builtins.eval``, a numpy reconstructor, ...) is refused in one line naming it.

The ``ema`` network's weights are then mapped onto ``nets.unet.UNet`` with ``adaptive_scale=False``, which is
EDM's DDPM++ ``SongUNet`` (``embedding_type="positional"``, ``encoder_type``/``decoder_type="standard"``,
``resample_filter=[1, 1]``, ``channel_mult_noise=1``): the EDM CIFAR-10 "vp" teachers. Three layout differences are
re-indexed, not approximated: EDM swaps the sin/cos halves of the noise embedding (columns of ``map_layer0``),
interleaves q/k/v per channel in its attention projection (rows of ``qkv``), and maps one-hot labels with a linear
layer (the rows of ``LabelEmbedding``'s table, whose null row is that layer's bias: EDM's "no label" input is a
zero vector). NCSN++ (Fourier embedding, [1, 3, 3, 1] filters, residual/skip encoders) and ADM (``DhariwalUNet``)
are different networks and are refused in one line.

EDM2 snapshots (Karras et al. 2024; ``--format edm2``, or ``auto`` when the ``ema`` record is a ``Precond``) go through
the same reader, which also rebuilds EDM2's ``dnnlib.EasyDict`` top level (a ``RecordDict``) and the numeric numpy
arrays of its latent encoder (a ``NumpyArrayRecord``). The ``Precond``'s tensors map one to one onto
``nets.edm2.EDM2UNet`` (EDM2's own module names; the U-Net and the log-variance head), its constructor arguments give
the architecture (unknown ones are refused), every Block / MPConv / MPFourier record is checked to sit where that
architecture puts it, and the ``encoder`` record gives the data: pixels (``StandardRGBEncoder``) or SD-VAE latents
with EDM2's per-channel map on [0, 1] pixels (``StabilityVAEEncoder``; the VAE comes from ``--vae``).
"""

from __future__ import annotations

import collections
import io
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_gen.diffusion.edm import EDM
from lit_gen.errors import LitGenError, load_restricted_pickle, load_torch_file
from lit_gen.importers import count_parameters, load_weights, pixel_data_info, write_teacher
from lit_gen.nets.unet import UNet, group_norm


class PersistentRecord:
    """An inert stand-in for a ``torch_utils.persistence`` object: its class name and state, never its code."""

    def __init__(self, meta: dict[str, Any]) -> None:
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise LitGenError("a persistent-class record without a state dict (not an EDM pickle?)")
        self.class_name = str(meta.get("class_name"))
        self.version = meta.get("version")
        self.state: dict[str, Any] = meta["state"]
        self.module_src_chars = len(str(meta.get("module_src", "")))  # kept as a number: the source is not run

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name})"


class ModuleRecord:
    """An inert stand-in for a plain ``torch.nn`` container (``ModuleDict``/``ModuleList``/``Sequential``)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def _reconstruct(meta: dict[str, Any]) -> PersistentRecord:
    return PersistentRecord(meta)


def _storage_from_bytes(data: bytes) -> Any:
    """A storage pickled by ``TypedStorage.__reduce__`` (a nested legacy torch file), read weights-only."""
    return load_torch_file(io.BytesIO(data), "a tensor storage inside the pickle")


def _numpy_dtype(name: Any, align: bool = False, copy: bool = False) -> Any:
    """``numpy.dtype`` for numeric types only (EDM stores numpy floats such as ``skip_scale = np.sqrt(0.5)``)."""
    import numpy as np

    dtype = np.dtype(str(name))
    if dtype.kind not in "biufc":
        raise LitGenError(f"refusing a numpy dtype {name!r} in the pickle (only numeric scalars are rebuilt)")
    return dtype


def _numpy_scalar(dtype: Any, data: Any) -> Any:
    """A numeric numpy scalar from its raw bytes, as a plain Python number (an inert value)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise LitGenError("refusing a numpy scalar that is not a number in the pickle")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


class RecordDict(dict):
    """An inert stand-in for ``dnnlib.util.EasyDict`` (a ``dict`` subclass: EDM2 snapshots are one, pickled with
    NEWOBJ + SETITEMS); attributes a hostile pickle sets on it stay data."""


class NumpyArrayRecord:
    """An inert stand-in for a numeric ``numpy.ndarray`` (EDM2's latent encoder keeps its per-channel scale and
    bias as float32 arrays): ``value`` is rebuilt from the raw bytes; object arrays are refused."""

    def __init__(self, *args: Any) -> None:
        self.value: Any = None

    def __setstate__(self, state: Any) -> None:
        import numpy as np

        if not isinstance(state, tuple) or len(state) != 5:
            raise LitGenError("refusing a numpy array of an unknown pickled layout")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(raw, bytes):
            raise LitGenError("refusing a numpy array that is not numeric in the pickle")
        order = "F" if fortran else "C"
        self.value = np.frombuffer(raw, dtype=dtype).reshape(tuple(shape), order=order).copy()


def _numpy_reconstruct(cls: Any, shape: Any, typecode: Any) -> NumpyArrayRecord:
    if cls is not NumpyArrayRecord:
        raise LitGenError("refusing a numpy array of another class than ndarray in the pickle")
    return NumpyArrayRecord()


ALLOWED_GLOBALS: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.storage._load_from_bytes": _storage_from_bytes,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "dnnlib.util.EasyDict": RecordDict,
    "numpy.ndarray": NumpyArrayRecord,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "torch.nn.modules.container.ModuleDict": ModuleRecord,
    "torch.nn.modules.container.ModuleList": ModuleRecord,
    "torch.nn.modules.container.Sequential": ModuleRecord,
}


def read_edm_pickle(path: str | Path, kind: str = "EDM") -> dict[str, Any]:
    """The top-level dict of an EDM / EDM2 (``kind``) snapshot, with inert records in place of its objects."""
    path = Path(path)
    if not path.is_file():
        raise LitGenError(f"{kind} pickle {path} does not exist")
    top = load_restricted_pickle(path, f"{kind} pickle {path}", ALLOWED_GLOBALS)
    if not isinstance(top, dict) or not isinstance(top.get("ema"), PersistentRecord):
        raise LitGenError(f"{path} is not an {kind} network snapshot (no 'ema' network in its top-level dict)")
    return top


# --------------------------------------------------------------------------------------------- module tree
def _children(record: Any) -> dict[str, Any]:
    state = getattr(record, "state", {}) or {}
    return dict(state.get("_modules") or {})


def flat_state_dict(record: Any, prefix: str = "") -> dict[str, Tensor]:
    """``module.state_dict()`` of a record tree: parameters and buffers with dotted names (None entries skipped)."""
    state = getattr(record, "state", {}) or {}
    out: dict[str, Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None:
                out[prefix + name] = value.detach() if isinstance(value, Tensor) else value
    for name, child in _children(record).items():
        if child is not None:
            out.update(flat_state_dict(child, f"{prefix}{name}."))
    return out


def _kwargs(record: PersistentRecord) -> dict[str, Any]:
    kwargs = record.state.get("_init_kwargs")
    if not isinstance(kwargs, dict):
        raise LitGenError(f"the {record.class_name} record has no constructor arguments (_init_kwargs)")
    return dict(kwargs)


SONGUNET_DEFAULTS: dict[str, Any] = {
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "label_dropout": 0,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
DDPMPP = {
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": [1, 1],
}


def unet_args(precond: PersistentRecord) -> tuple[dict[str, Any], int]:
    """lit_gen ``UNet`` arguments equal to the EDM network, and its label_dim; refuses what UNet is not."""
    if precond.class_name == EDM2_PRECOND:
        raise LitGenError("the 'ema' network is EDM2's Precond (magnitude-preserving U-Net): pass --format edm2")
    if precond.class_name != "EDMPrecond":
        raise LitGenError(
            f"the 'ema' network is a {precond.class_name}; lit_gen imports EDMPrecond teachers (VP/VE/iDDPM "
            "preconditioners of EDM's baselines have other c_in/c_noise)"
        )
    model = _children(precond).get("model")
    if not isinstance(model, PersistentRecord):
        raise LitGenError("the EDMPrecond record has no 'model' network")
    if model.class_name != "SongUNet":
        raise LitGenError(
            f"the EDM network is a {model.class_name}; lit_gen's UNet is EDM's SongUNet in its DDPM++ setting "
            "(ADM's DhariwalUNet is a different architecture)"
        )
    kw = {**SONGUNET_DEFAULTS, **_kwargs(model)}
    for key, want in DDPMPP.items():
        have = list(kw[key]) if isinstance(kw[key], (list, tuple)) else kw[key]
        if have != want:
            raise LitGenError(
                f"this SongUNet has {key}={have!r}; lit_gen's UNet is the DDPM++ setting ({key}={want!r}), so "
                "NCSN++-style EDM networks are not imported"
            )
    args = {
        "img_resolution": int(kw["img_resolution"]),
        "in_channels": int(kw["in_channels"]),
        "out_channels": int(kw["out_channels"]),
        "model_channels": int(kw["model_channels"]),
        "channel_mult": [int(m) for m in kw["channel_mult"]],
        "num_blocks": int(kw["num_blocks"]),
        "attn_resolutions": [int(r) for r in kw["attn_resolutions"]],
        "dropout": float(kw["dropout"]),
        "num_classes": int(kw.get("label_dim") or 0),
        "embedding_type": "positional",
        "channel_mult_emb": int(kw["channel_mult_emb"]),
        "adaptive_scale": False,
    }
    return args, args["num_classes"]


# ------------------------------------------------------------------------------------------- weight mapping
def _qkv_rows(w: Tensor) -> Tensor:
    """EDM's qkv output channel c·3 + j (it reshapes to [C, 3, HW]) → lit_gen's j·C + c ([3, C, HW])."""
    c = w.shape[0] // 3
    return w.reshape(c, 3, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _unflip(v: Tensor, dim: int) -> Tensor:
    """EDM's noise embedding is [sin, cos] (it flips the halves); lit_gen's is [cos, sin]: swap the halves back."""
    h = v.shape[dim] // 2
    return torch.cat([v.narrow(dim, h, h), v.narrow(dim, 0, h)], dim=dim)


def _block(src: dict[str, Tensor], edm: str, lit: str) -> dict[str, Tensor]:
    out = {}
    for key, value in src.items():
        if not key.startswith(edm + ".") or key.endswith("resample_filter"):
            continue  # the [1, 1] resampling filter is avg-pool / nearest in lit_gen: no tensor
        name = key[len(edm) + 1 :]
        out[f"{lit}.{name}"] = _qkv_rows(value) if name.startswith("qkv.") else value
    return out


def map_weights(precond: PersistentRecord, num_classes: int) -> dict[str, Tensor]:
    """The EDM SongUNet's tensors under lit_gen ``UNet`` names (see the module docstring for the re-indexing)."""
    model = _children(precond)["model"]
    src = flat_state_dict(model)
    out: dict[str, Tensor] = {}
    w0 = src["map_layer0.weight"]
    out["map_layer0.weight"] = _unflip(w0, 1)
    out["map_layer0.bias"] = src["map_layer0.bias"]
    for name in ("map_layer1.weight", "map_layer1.bias"):
        out[name] = src[name]
    if num_classes:
        w, b = src["map_label.weight"], src.get("map_label.bias")  # [C, L], [C]
        b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        rows = w.t() * math.sqrt(w.shape[1]) + b  # one-hot·√L through the linear layer (EDM's SongUNet.forward)
        out["map_label.table.weight"] = _unflip(torch.cat([rows, b[None]]), 1)
    enc = list(_children(_children(model)["enc"]).keys())
    dec = list(_children(_children(model)["dec"]).keys())
    if not enc or not enc[0].endswith("_conv"):
        raise LitGenError("the EDM encoder does not start with its input convolution (not a standard encoder)")
    for key in ("weight", "bias"):
        out[f"conv_in.{key}"] = src[f"enc.{enc[0]}.{key}"]
    for i, name in enumerate(enc[1:]):
        out.update(_block(src, f"enc.{name}", f"enc.{i}"))
    blocks = [n for n in dec if "_aux_" not in n]
    for i, name in enumerate(blocks[:2]):
        out.update(_block(src, f"dec.{name}", f"mid.{i}"))
    for i, name in enumerate(blocks[2:]):
        out.update(_block(src, f"dec.{name}", f"dec.{i}"))
    norm = next((n for n in dec if n.endswith("_aux_norm")), None)
    conv = next((n for n in dec if n.endswith("_aux_conv")), None)
    if norm is None or conv is None:
        raise LitGenError("the EDM decoder has no output norm/conv (aux_norm/aux_conv)")
    for key in ("weight", "bias"):
        out[f"out_norm.{key}"] = src[f"dec.{norm}.{key}"]
        out[f"out_conv.{key}"] = src[f"dec.{conv}.{key}"]
    return {k: v.float().contiguous() for k, v in out.items()}


def _check_groups(model: PersistentRecord, net: UNet) -> None:
    """EDM's GroupNorm uses min(32, C // 4) groups; lit_gen's rule must give the same count for every norm."""
    stack = [("", model)]
    while stack:
        prefix, record = stack.pop()
        state = getattr(record, "state", {}) or {}
        if getattr(record, "class_name", "") == "GroupNorm" and "num_groups" in state:
            channels = int(state["_parameters"]["weight"].shape[0])
            if group_norm(channels).num_groups != int(state["num_groups"]):
                raise LitGenError(f"{prefix}: EDM uses {state['num_groups']} groups for {channels} channels")
        stack.extend((f"{prefix}{n}.", c) for n, c in _children(record).items() if c is not None)


def import_edm(src: str | Path, out: str | Path, top: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import the EDM snapshot ``src`` (already read: ``top``) into ``out`` (.safetensors); returns a short report."""
    start = time.perf_counter()
    top = read_edm_pickle(src) if top is None else top
    precond: PersistentRecord = top["ema"]
    args, num_classes = unet_args(precond)
    net = UNet(**args)
    _check_groups(_children(precond)["model"], net)
    load_weights(net, map_weights(precond, num_classes), f"EDM pickle {src}")
    loss = top.get("loss_fn")
    loss_state = loss.state if isinstance(loss, PersistentRecord) else {}
    state = precond.state
    sigma_min = float(state.get("sigma_min", 0) or 0)
    sigma_max = float(state.get("sigma_max", math.inf))
    param = EDM(
        sigma_data=float(state.get("sigma_data", 0.5)),
        p_mean=float(loss_state.get("P_mean", -1.2)),
        p_std=float(loss_state.get("P_std", 1.2)),
        sigma_min=sigma_min if sigma_min > 0 else 0.002,  # EDMPrecond's defaults (0, inf) mean "no limit":
        sigma_max=sigma_max if math.isfinite(sigma_max) else 80.0,  # the EDM sampler's grid then
    )
    data = pixel_data_info(args["in_channels"], args["img_resolution"], num_classes)
    source = {"format": "edm", "path": str(src), "class": "EDMPrecond(SongUNet DDPM++)"}
    write_teacher(out, net, param, data, source, {"sampler": "heun", "steps": 18})
    return {
        "out": str(out),
        "format": "edm",
        "model_class": "EDMPrecond(SongUNet)",
        "parameters": count_parameters(net),
        "param": repr(param),
        "seconds": round(time.perf_counter() - start, 3),
    }


@torch.no_grad()
def conformance(out: str | Path, src: str | Path, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """What can be checked without running the pickle's code: every tensor of the EDM network is used (none
    missing, none left over but the resampling filters and the training-only augmentation map), and the
    imported file reads back to the same tensors. (No EDM implementation is importable to compare outputs.)"""
    from lit_gen.export import load_model

    top = read_edm_pickle(src)
    precond = top["ema"]
    _, num_classes = unet_args(precond)
    mapped = map_weights(precond, num_classes)
    loaded = load_model(out)
    state = loaded.net.state_dict()
    worst = max(float((state[k].float() - v).abs().max()) for k, v in mapped.items())
    source = flat_state_dict(_children(precond)["model"])
    unused = [k for k in source if not k.endswith("resample_filter") and not k.startswith("map_augment.")]
    used_elements = sum(v.numel() for k, v in source.items() if k in unused)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *loaded.data_info["shape"], generator=generator) * 2.0
    d = loaded.denoiser()(x, torch.full((batch,), 2.0), None)
    return {
        "parameters_lit_gen": count_parameters(loaded.net),
        "parameters_source_used": used_elements,
        "weights_max_abs": worst,
        "denoiser_finite": bool(torch.isfinite(d).all()),
        "faithful": worst == 0.0 and count_parameters(loaded.net) == used_elements,
    }


# ================================================================================================ EDM2
# NVlabs/edm2 (Karras et al. 2024) writes ``dnnlib.EasyDict(encoder=..., dataset_kwargs=..., loss_fn=EDM2Loss,
# ema=Precond)`` per snapshot (``training_loop.py``; ``reconstruct_phema.py`` writes its post-hoc EMA pickles as a
# deep copy of one with ``ema`` replaced), every network in float16. ``Precond`` holds ``unet`` (EDM2's ``UNet``) and
# the log-variance head ``logvar_fourier`` / ``logvar_linear``; they map one to one onto ``nets.edm2.EDM2UNet``.
EDM2_PRECOND = "Precond"
EDM2_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
EDM2_UNET_DEFAULTS: dict[str, Any] = {
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_noise": None,
    "channel_mult_emb": None,
    "num_blocks": 3,
    "attn_resolutions": [16, 8],
    "label_balance": 0.5,
    "concat_balance": 0.5,
    "resample_filter": [1, 1],
    "channels_per_head": 64,
    "dropout": 0.0,
    "res_balance": 0.3,
    "attn_balance": 0.3,
    "clip_act": 256,
}
EDM2_LOSS_DEFAULTS = {"P_mean": -0.4, "P_std": 1.0}  # EDM2Loss's defaults (the ImageNet-512 presets)
EDM2_SAMPLING = {"sampler": "heun", "steps": 32}  # generate_images.py: EDM's Heun sampler, 32 steps, σ 0.002 … 80
EDM2_PIXEL_RANGE = [0.0, 1.0]  # StabilityVAEEncoder feeds the VAE pixels / 255 and decodes clamp(0, 1) · 255


def edm2_args(precond: PersistentRecord) -> dict[str, Any]:
    """``EDM2UNet`` arguments equal to an EDM2 ``Precond`` record's constructor arguments (unknown ones refused)."""
    if precond.class_name == "EDMPrecond":
        raise LitGenError("the 'ema' network is EDM's EDMPrecond (not EDM2): pass --format edm (or auto)")
    if precond.class_name != EDM2_PRECOND:
        raise LitGenError(f"the 'ema' network is a {precond.class_name}; an EDM2 snapshot holds a Precond")
    unet = _children(precond).get("unet")
    if not isinstance(unet, PersistentRecord) or unet.class_name != "UNet":
        raise LitGenError("the EDM2 Precond record has no 'unet' network (UNet)")
    kw = _kwargs(precond)
    positional = precond.state.get("_init_args") or ()
    if len(positional) > len(EDM2_POSITIONAL):
        raise LitGenError(f"the EDM2 Precond record has {len(positional)} positional arguments; Precond takes 6")
    kw.update(dict(zip(EDM2_POSITIONAL, positional, strict=False)))
    missing = [k for k in EDM2_POSITIONAL[:3] if k not in kw]
    if missing:
        raise LitGenError(f"the EDM2 Precond record lacks the constructor argument {missing[0]}")
    unknown = sorted(set(kw) - set(EDM2_POSITIONAL) - set(EDM2_UNET_DEFAULTS))
    if unknown:
        raise LitGenError(f"the EDM2 network has the argument {unknown[0]!r} that EDM2's UNet/Block do not know")
    kw = {**EDM2_UNET_DEFAULTS, **kw}

    def optional_int(v: Any) -> int | None:
        return None if v is None else int(v)

    return {
        "img_resolution": int(kw["img_resolution"]),
        "in_channels": int(kw["img_channels"]),
        "num_classes": int(kw["label_dim"] or 0),
        "model_channels": int(kw["model_channels"]),
        "channel_mult": [int(m) for m in kw["channel_mult"]],
        "channel_mult_noise": optional_int(kw["channel_mult_noise"]),
        "channel_mult_emb": optional_int(kw["channel_mult_emb"]),
        "num_blocks": int(kw["num_blocks"]),
        "attn_resolutions": [int(r) for r in kw["attn_resolutions"]],
        "label_balance": float(kw["label_balance"]),
        "concat_balance": float(kw["concat_balance"]),
        "resample_filter": [float(f) for f in kw["resample_filter"]],
        "channels_per_head": int(kw["channels_per_head"]),
        "dropout": float(kw["dropout"]),
        "res_balance": float(kw["res_balance"]),
        "attn_balance": float(kw["attn_balance"]),
        "clip_act": None if kw["clip_act"] is None else float(kw["clip_act"]),
        "logvar_channels": int(kw.get("logvar_channels", 128)),
    }


def _edm2_source_name(name: str) -> str:
    """The ``Precond`` path of an ``EDM2UNet`` submodule or tensor (the head lives in Precond, the rest in unet)."""
    return name if name.startswith("logvar_") else f"unet.{name}"


def _record_at(root: Any, path: str) -> Any:
    record = root
    for part in path.split("."):
        record = _children(record).get(part)
        if record is None:
            return None
    return record


def _check_edm2_tree(precond: PersistentRecord, net: torch.nn.Module) -> None:
    """Every MPConv / Block / MPFourier of the network is a record of that class at the same place, and every Block
    has the source's flavour, resampling and number of attention heads (the architecture is the recorded one)."""
    for name, module in net.named_modules():
        kind = type(module).__name__
        if not name or kind not in ("MPConv", "Block", "MPFourier") or name.startswith(("map_aux", "map_guide")):
            continue
        record = _record_at(precond, _edm2_source_name(name))
        if not isinstance(record, PersistentRecord) or record.class_name != kind:
            found = getattr(record, "class_name", None) if record is not None else "nothing"
            raise LitGenError(
                f"EDM2 network: {_edm2_source_name(name)} is {found}, the recorded architecture has a {kind}"
            )
        if kind == "Block":
            for attr in ("flavor", "resample_mode", "num_heads"):
                if record.state.get(attr) != getattr(module, attr):
                    raise LitGenError(
                        f"EDM2 network: {_edm2_source_name(name)} has {attr}={record.state.get(attr)!r}, the recorded "
                        f"architecture {getattr(module, attr)!r}"
                    )


def map_edm2_weights(precond: PersistentRecord) -> dict[str, Tensor]:
    """The Precond's tensors under ``EDM2UNet`` names: ``unet.`` dropped, float32 (the pickles hold float16, which
    float32 represents exactly), Fourier frequencies/phases as their float32 bit patterns (``*_bits``)."""
    out: dict[str, Tensor] = {}
    for key, value in flat_state_dict(precond).items():
        if not isinstance(value, Tensor):
            raise LitGenError(f"EDM2 network: {key} is not a tensor")
        name = key[len("unet.") :] if key.startswith("unet.") else key
        value = value.to(torch.float32).contiguous()
        if name.endswith((".freqs", ".phases")):
            out[name + "_bits"] = value.view(torch.int32)
        else:
            out[name] = value
    return out


def _channel_values(value: Any, channels: int, what: str) -> list[float]:
    if isinstance(value, NumpyArrayRecord):
        value = value.value
    if hasattr(value, "reshape"):
        value = value.reshape(-1).tolist()
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * channels
    if len(values) != channels:
        raise LitGenError(f"the EDM2 encoder's {what} has {len(values)} entries for {channels} latent channels")
    return values


def edm2_latent_map(encoder: PersistentRecord, channels: int) -> dict[str, Any]:
    """lit_gen's latent map of EDM2's ``StabilityVAEEncoder``: EDM2's final latents are z = E(x/255)·scale + bias
    per channel (scale = final_std / raw_std, bias = final_mean − raw_mean·scale), i.e. lit_gen's
    z = (E(x) − shift)·scaling with scaling = scale, shift = −bias / scale, on pixels in [0, 1]."""
    scale = _channel_values(encoder.state.get("scale"), channels, "scale")
    bias = _channel_values(encoder.state.get("bias"), channels, "bias")
    if any(not s > 0 for s in scale):
        raise LitGenError(f"the EDM2 encoder has a non-positive latent scale {scale}")
    return {
        "scaling_factor": scale,
        "shift_factor": [-b / s for b, s in zip(bias, scale, strict=True)],
        "pixel_range": list(EDM2_PIXEL_RANGE),
    }


def _vae_folder(vae: str | Path) -> Path:
    vae_dir = Path(vae).expanduser()
    if (vae_dir / "model_index.json").is_file() and (vae_dir / "vae").is_dir():
        vae_dir = vae_dir / "vae"  # a pipeline folder: its VAE
    if not (vae_dir / "config.json").is_file():
        raise LitGenError(f"--vae {vae} is no AutoencoderKL folder (no config.json)")
    return vae_dir.resolve()


def edm2_data(
    top: dict[str, Any], args: dict[str, Any], vae: str | Path | None, where: str
) -> tuple[dict[str, Any], dict[str, Tensor] | None, dict[str, Any]]:
    """(data description, carried VAE tensors or None, source notes) of an EDM2 snapshot: pixels for
    ``StandardRGBEncoder`` (ImageNet-64), SD-VAE latents with EDM2's per-channel normalisation for
    ``StabilityVAEEncoder`` (ImageNet-512; ``--vae`` names the AutoencoderKL folder)."""
    encoder = top.get("encoder")
    kind = encoder.class_name if isinstance(encoder, PersistentRecord) else None
    channels, res, classes = args["in_channels"], args["img_resolution"], args["num_classes"]
    if kind == "StandardRGBEncoder" or (kind is None and encoder is None and channels == 3):
        if vae is not None:
            raise LitGenError(f"{where} denoises pixels (no latent encoder); it takes no --vae")
        return pixel_data_info(channels, res, classes), None, {"encoder": kind or "pixels"}
    if kind != "StabilityVAEEncoder":
        raise LitGenError(
            f"{where}: unknown EDM2 encoder {kind or type(encoder).__name__!r} (StandardRGBEncoder or "
            "StabilityVAEEncoder are imported)"
        )
    vae_name = str(encoder.state.get("vae_name", "stabilityai/sd-vae-ft-mse"))
    if vae is None:
        raise LitGenError(
            f"{where} denoises Stable Diffusion VAE latents: pass --vae FOLDER (the AutoencoderKL it was trained "
            f"with, {vae_name}, saved on disk)"
        )
    from lit_gen.importers.diffusers import read_vae
    from lit_gen.latents import VAE_PREFIX, downsample_factor, latent_info, vae_record

    vae_dir = _vae_folder(vae)
    config, tensors = read_vae(vae_dir)
    if int(config.get("latent_channels", 4)) != channels:
        raise LitGenError(
            f"the VAE {vae_dir} makes {config.get('latent_channels')}-channel latents, the EDM2 network takes "
            f"{channels}"
        )
    side = res * downsample_factor(config)
    image_shape = [int(config.get("in_channels", 3)), side, side]
    record = vae_record(config, tensors, None, image_shape, "sample", latent_map=edm2_latent_map(encoder, channels))
    notes = {"encoder": kind, "vae_name": vae_name, "vae": str(vae_dir)}
    return latent_info(record, [channels, res, res], classes), {VAE_PREFIX + k: v for k, v in tensors.items()}, notes


def import_edm2(
    src: str | Path, out: str | Path, vae: str | Path | None = None, top: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Import the EDM2 snapshot ``src`` (a training snapshot or a post-hoc EMA reconstruction) into ``out``."""
    from lit_gen.nets.edm2 import EDM2UNet

    start = time.perf_counter()
    top = read_edm_pickle(src) if top is None else top
    precond: PersistentRecord = top["ema"]
    args = edm2_args(precond)
    data, extra, notes = edm2_data(top, args, vae, f"EDM2 pickle {src}")
    with torch.device("meta"):  # no random initialisation of a full-size net: the pickle's tensors become it
        net = EDM2UNet(**args)
    _check_edm2_tree(precond, net)
    weights = map_edm2_weights(precond)
    with warnings.catch_warnings():  # the one-line shape / key checks; copying into meta tensors is a no-op
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        load_weights(net, weights, f"EDM2 pickle {src}")
    net.load_state_dict(weights, strict=True, assign=True)
    del weights
    loss = top.get("loss_fn")
    loss_state = {**EDM2_LOSS_DEFAULTS, **(loss.state if isinstance(loss, PersistentRecord) else {})}
    param = EDM(
        sigma_data=float(precond.state.get("sigma_data", 0.5)),  # c_in, c_skip, c_out of EDM; c_noise = ln(σ)/4
        p_mean=float(loss_state["P_mean"]),
        p_std=float(loss_state["P_std"]),
        sigma_min=0.002,
        sigma_max=80.0,
    )
    source = {
        "format": "edm2",
        "path": str(src),
        "class": "Precond(EDM2 UNet)",
        "use_fp16": bool(precond.state.get("use_fp16", False)),
        **notes,
    }
    write_teacher(out, net.eval().requires_grad_(False), param, data, source, dict(EDM2_SAMPLING), extra)
    return {
        "out": str(out),
        "format": "edm2",
        "model_class": "Precond(EDM2 UNet)",
        "parameters": count_parameters(net),
        "param": repr(param),
        "seconds": round(time.perf_counter() - start, 3),
    }


@torch.no_grad()
def conformance_edm2(
    out: str | Path, src: str | Path, vae: str | Path | None = None, batch: int = 2, seed: int = 0
) -> dict[str, Any]:
    """What can be checked without running the pickle's code (no EDM2 implementation is importable here; the
    network's function is tested against EDM2's equations in tests/test_import_edm2.py):

    - ``weights_max_abs``: every source tensor read back from ``out`` against the pickle (0: bit-exact);
    - ``elements_source`` / ``elements_lit_gen``: every parameter and buffer of the Precond is used, none added;
    - ``stored_weight_magnitude``: [min, max] over MPConv output channels of ‖w‖/√fan_in of the stored weights (EDM2's
      forced normalisation keeps a trained network's at 1 − O(1e-4); reported, not judged);
    - the denoiser and the log-variance head are finite at σ = 0.002 … 80;
    - for a latent teacher, ``vae_decode_max_abs_fp32``: lit_gen's decode of the carried VAE against diffusers'
      ``AutoencoderKL.from_pretrained(--vae).decode((z − bias)/scale)`` clamped to [0, 1] × 255 (EDM2's decode).
    """
    from lit_gen.export import load_model
    from lit_gen.nets.edm2 import MPConv

    top = read_edm_pickle(src)
    precond = top["ema"]
    mapped = map_edm2_weights(precond)
    loaded = load_model(out)
    state = loaded.net.state_dict()
    worst = 0.0
    for key, value in mapped.items():
        mine = state[key]
        if value.dtype == torch.int32:
            worst = max(worst, 0.0 if torch.equal(mine, value) else math.inf)
        else:
            worst = max(worst, float((mine.double() - value.double()).abs().max()))
    elements_source = sum(v.numel() for v in flat_state_dict(precond).values())
    elements_mine = sum(v.numel() for k, v in state.items() if not k.startswith(("map_aux.", "map_guide.")))
    magnitudes = []
    for module in loaded.net.modules():
        if isinstance(module, MPConv):
            w = module.weight.double().reshape(module.weight.shape[0], -1)
            magnitudes.append((w.norm(dim=1) / math.sqrt(w.shape[1])).aminmax())
    generator = torch.Generator().manual_seed(seed)
    shape = loaded.data_info["shape"]
    finite = True
    for sigma in (0.002, 0.5, 80.0):
        x = torch.randn(batch, *shape, generator=generator) * math.sqrt(sigma**2 + 0.25)
        d = loaded.denoiser()(x, torch.full((batch,), sigma), None)
        finite = finite and bool(torch.isfinite(d).all())
    logvar = loaded.net.logvar(loaded.param.c_noise(torch.tensor([0.002, 0.5, 80.0])))
    report: dict[str, Any] = {
        "parameters_lit_gen": count_parameters(loaded.net),
        "elements_source": elements_source,
        "elements_lit_gen": elements_mine,
        "tensors_source": len(mapped),
        "weights_max_abs": worst,
        "stored_weight_magnitude": [min(float(m.min) for m in magnitudes), max(float(m.max) for m in magnitudes)],
        "denoiser_finite": finite,
        "logvar_finite": bool(torch.isfinite(logvar).all()),
    }
    vae_ok = True
    if loaded.data_info.get("kind") == "latent":
        if vae is None:
            vae = (loaded.description.get("source") or {}).get("vae")
        report["vae_decode_max_abs_fp32"] = _compare_edm2_vae(loaded.data_info, _vae_folder(vae), batch, seed)
        from lit_gen.importers.diffusers import VAE_TOL

        vae_ok = report["vae_decode_max_abs_fp32"] <= VAE_TOL
    report["faithful"] = bool(
        worst == 0.0 and elements_source == elements_mine and finite and report["logvar_finite"] and vae_ok
    )
    return report


def _compare_edm2_vae(info: dict[str, Any], vae_dir: Path, batch: int, seed: int) -> float:
    """max |decode_lit(z) − EDM2's decode(z)| in 0..255 units: EDM2's ``StabilityVAEEncoder.decode`` is
    ``vae.decode((z − bias) / scale).clamp(0, 1) · 255`` (bias, scale per channel), written here with diffusers'
    own ``AutoencoderKL.from_pretrained``."""
    from diffusers import AutoencoderKL

    from lit_gen.latents import decode_latents

    record = info["vae"]
    scale = torch.tensor(record["scaling_factor"]).reshape(1, -1, 1, 1)
    bias = -torch.tensor(record["shift_factor"]).reshape(1, -1, 1, 1) * scale
    reference = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    z = torch.randn(batch, *info["shape"], generator=torch.Generator().manual_seed(seed + 1))
    expected = reference.decode((z - bias) / scale).sample.clamp(0, 1) * 255
    return float((decode_latents(z, info) - expected).abs().max())
