"""Teachers from elsewhere: each module turns one source format into the one lit_gen teacher format.

``diffusers`` (pipeline or model folders, diffusers' own model classes behind ``nets.diffusers_adapter``) and
``edm_pickle`` (NVlabs EDM ``network-snapshot-*.pkl``, read without executing the pickle) and ``dit``
(facebookresearch DiT/SiT ``.pt`` state dicts, mapped onto diffusers' ``DiTTransformer2DModel``). The output is a
``.safetensors`` file whose metadata holds the same description ``lit-gen export`` writes, so ``lit-gen sample``,
``lit-gen eval`` and every distillation recipe's ``--model.init_args.teacher`` read it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lit_gen.errors import LitGenError
from lit_gen.spec import describe

FORMAT = 1  # the lit_gen checkpoint description format (methods.base.CHECKPOINT_FORMAT)


def pixel_data_info(channels: int, resolution: int, num_classes: int) -> dict[str, Any]:
    """The ``dataset.json``-style description of an imported pixel teacher: images in [-1, 1] (shift = scale =
    127.5, the convention of ``data.info``); it trained on data lit_gen never saw, so no samples or shards."""
    return {
        "format": 1,
        "kind": "image",
        "shape": [int(channels), int(resolution), int(resolution)],
        "num_samples": 0,
        "num_classes": int(num_classes),
        "normalize": {"shift": 127.5, "scale": 127.5},
        "shards": [],
    }


def write_teacher(
    out: str | Path,
    net: nn.Module,
    param: Any,
    data: dict[str, Any],
    source: dict[str, Any],
    sampling: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``net``'s weights and the self-describing description to ``out`` (atomically, via a temporary file);
    ``extra`` tensors (a latent teacher's VAE under ``latents.VAE_PREFIX``) travel in the same file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LitGenError(f"--out must end in .safetensors, got {out}")
    description = {
        "format": FORMAT,
        "method": "import",
        "net": describe(net),
        "param": describe(param),
        "data": data,
        "sampling": sampling,
        "weights": "ema",
        "source": source,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    tensors.update({k: v.detach().contiguous() for k, v in (extra or {}).items()})
    save_file(tensors, str(tmp), metadata={"lit_gen": json.dumps(description)})
    tmp.replace(out)
    return out


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_weights(net: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """``net.load_state_dict(tensors)`` with a one-line error for a tensor of another shape, a missing or an extra
    one (the message names the first)."""
    expected = net.state_dict()
    for key, value in tensors.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise LitGenError(
                f"{where}: shape mismatch for {key}: {list(value.shape)} in the file, {list(expected[key].shape)} "
                "in the network its config describes"
            )
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise LitGenError(
            f"{where}: weights do not match the network its config describes (missing {len(missing)}, unexpected "
            f"{len(unexpected)}, e.g. {(missing or unexpected)[0]})"
        )
    net.load_state_dict(tensors, strict=True)
