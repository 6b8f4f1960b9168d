"""Import an NVlabs EDM teacher (``network-snapshot-*.pkl``) without running the pickle.

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
"""

from __future__ import annotations

import collections
import io
import math
import time
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


def _easydict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


ALLOWED_GLOBALS: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.storage._load_from_bytes": _storage_from_bytes,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "dnnlib.util.EasyDict": _easydict,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "torch.nn.modules.container.ModuleDict": ModuleRecord,
    "torch.nn.modules.container.ModuleList": ModuleRecord,
    "torch.nn.modules.container.Sequential": ModuleRecord,
}


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an EDM snapshot, with inert records in place of its objects."""
    path = Path(path)
    if not path.is_file():
        raise LitGenError(f"EDM pickle {path} does not exist")
    top = load_restricted_pickle(path, f"EDM pickle {path}", ALLOWED_GLOBALS)
    if not isinstance(top, dict) or not isinstance(top.get("ema"), PersistentRecord):
        raise LitGenError(f"{path} is not an EDM network snapshot (no 'ema' network in its top-level dict)")
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


def import_edm(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Import the EDM snapshot ``src`` into ``out`` (.safetensors); returns a short report."""
    start = time.perf_counter()
    top = read_edm_pickle(src)
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
