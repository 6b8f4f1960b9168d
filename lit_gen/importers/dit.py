"""Import a facebookresearch DiT ``.pt`` state dict (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers") onto diffusers' own ``DiTTransformer2DModel`` (``nets.diffusers_adapter.DiffusersNet``).

The file is read with ``errors.load_torch_file`` (``torch.load(weights_only=True)``: tensors only, no code). DiT's
keys (its ``models.py``) map onto diffusers' names as diffusers' ``scripts/convert_dit_to_diffusers.py`` maps them
(read for the facts, written here from them):

- ``x_embedder.proj.*`` → ``pos_embed.proj.*`` (the patch convolution); DiT's ``pos_embed`` is the fixed 2-D
  sin-cos table, which diffusers recomputes (a non-persistent buffer): it is compared with diffusers' and refused
  when it differs;
- ``t_embedder.mlp.{0,2}.*`` and ``y_embedder.embedding_table.weight`` → every block's
  ``norm1.emb.timestep_embedder.linear_{1,2}.*`` and ``norm1.emb.class_embedder.embedding_table.weight`` (diffusers
  keeps one copy of the conditioning embedder per block);
- ``blocks.N.adaLN_modulation.1.*`` → ``transformer_blocks.N.norm1.linear.*`` (same shift/scale/gate order);
  ``blocks.N.attn.qkv.*`` split in three along the output → ``attn1.to_{q,k,v}.*``; ``attn.proj`` →
  ``attn1.to_out.0``; ``mlp.fc1`` / ``mlp.fc2`` → ``ff.net.0.proj`` / ``ff.net.2``;
- ``final_layer.adaLN_modulation.1.*`` → ``proj_out_1.*``, ``final_layer.linear.*`` → ``proj_out_2.*``.

Two settings make diffusers' module compute DiT's function exactly (the conversion script leaves both at diffusers'
defaults): DiT's sinusoidal timestep features use frequencies exp(−ln 10⁴ · i / half) (``downscale_freq_shift`` 0,
diffusers' DiT uses 1), and its LayerNorms use ε = 1e-6. The model size comes from ``--arch`` (DiT's Table 1:
S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16 for hidden/depth/heads; /2, /4, /8 the patch): hidden size,
depth and patch are read from the tensors and must match it; the number of heads is not in the tensors. A DiT that
learned its variance (``learn_sigma``, 2C outputs) returns its ε half, as the diffusers path does. The diffusion is
DiT's: DDPM, linear β from 1e-4 to 0.02 over 1000 steps, ε-prediction (``DiscreteVP``). DiT denoises Stable
Diffusion VAE latents (× 0.18215), so ``--vae`` names that ``AutoencoderKL`` and the teacher carries it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from lit_gen.diffusion.discrete import DiscreteVP
from lit_gen.errors import LitGenError, load_torch_file
from lit_gen.importers import load_weights
from lit_gen.importers.diffusers import finish_import, read_vae, state_dict_of
from lit_gen.nets.diffusers_adapter import DiffusersNet

# DiT's Table 1 (Peebles & Xie 2023): (hidden size, depth, heads); the patch size is the "/p" of the name.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
ARCHS: dict[str, tuple[int, int, int, int]] = {
    f"DiT-{size}/{patch}": (*dims, patch) for size, dims in DIT_SIZES.items() for patch in (2, 4, 8)
}
POS_EMBED_TOL = 1e-4  # max |pos_embed_file − diffusers' sin-cos table|: the same fixed table up to float32
REQUIRED = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "final_layer.linear.weight",
    "blocks.0.attn.qkv.weight",
)


def parse_arch(arch: str | None, heads: int | None) -> tuple[int | None, int | None, int, int | None]:
    """(hidden, depth, heads, patch) of ``--arch`` (a name of ``ARCHS``), or of a custom size given by ``--heads``
    alone (hidden, depth and patch then come from the tensors)."""
    if arch is None:
        if heads is None:
            raise LitGenError(f"a DiT .pt needs its size: pass --arch ({', '.join(ARCHS)}) or --heads N")
        return None, None, int(heads), None
    if arch not in ARCHS:
        raise LitGenError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    hidden, depth, arch_heads, patch = ARCHS[arch]
    return hidden, depth, int(heads or arch_heads), patch


def read_dit_state(path: Path) -> dict[str, torch.Tensor]:
    """The DiT state dict of ``path`` (a plain state dict, or a training checkpoint's ``ema`` / ``model`` entry)."""
    obj = load_torch_file(path, f"DiT state dict {path}")
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj.get("ema", obj.get("model", obj))  # DiT's train.py saves {"model", "ema", "opt", "args"}
    state = state_dict_of(obj, path)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise LitGenError(f"{path} is not a DiT state dict (no {missing[0]}; facebookresearch DiT models.py keys)")
    return state


def dit_config(state: dict[str, torch.Tensor], arch: str | None, heads: int | None, where: Path) -> dict[str, Any]:
    """diffusers ``DiTTransformer2DModel`` config of a DiT state dict, checked against ``--arch``."""
    want_hidden, want_depth, n_heads, want_patch = parse_arch(arch, heads)
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    found = {"hidden size": (hidden, want_hidden), "depth": (depth, want_depth), "patch": (patch, want_patch)}
    for name, (have, want) in found.items():
        if want is not None and have != want:
            raise LitGenError(f"{where}: --arch {arch} has {name} {want}, the state dict {have}")
    if hidden % n_heads:
        raise LitGenError(f"{where}: hidden size {hidden} is not divisible into {n_heads} heads")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if "pos_embed" not in state:
        raise LitGenError(f"{where} has no pos_embed (DiT keeps its fixed sin-cos table in the state dict)")
    side = round(state["pos_embed"].shape[1] ** 0.5) * patch
    table = state.get("y_embedder.embedding_table.weight")
    num_classes = 0 if table is None else table.shape[0] - 1  # DiT: K classes + the null row for guidance
    if num_classes < 1:
        raise LitGenError(f"{where}: a class-conditional DiT is expected (y_embedder with K classes + 1 null row)")
    return {
        "num_attention_heads": n_heads,
        "attention_head_dim": hidden // n_heads,
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "num_layers": depth,
        "sample_size": int(side),
        "patch_size": int(patch),
        "attention_bias": True,
        "activation_fn": "gelu-approximate",  # timm Mlp with GELU(approximate="tanh")
        "num_embeds_ada_norm": int(num_classes),
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # DiT's LayerNorms
    }


def map_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """DiT names → diffusers ``DiTTransformer2DModel`` names (see the module docstring); every DiT tensor but
    ``pos_embed`` is used, an unknown one is an error."""
    used = {"pos_embed"}
    out: dict[str, torch.Tensor] = {}

    def take(src: str) -> torch.Tensor:
        if src not in state:
            raise LitGenError(f"the DiT state dict lacks {src}")
        used.add(src)
        return state[src]

    for kind in ("weight", "bias"):
        out[f"pos_embed.proj.{kind}"] = take(f"x_embedder.proj.{kind}")
        out[f"proj_out_1.{kind}"] = take(f"final_layer.adaLN_modulation.1.{kind}")
        out[f"proj_out_2.{kind}"] = take(f"final_layer.linear.{kind}")
    for n in range(depth):
        to, src = f"transformer_blocks.{n}.", f"blocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{to}norm1.emb.timestep_embedder.linear_1.{kind}"] = take(f"t_embedder.mlp.0.{kind}")
            out[f"{to}norm1.emb.timestep_embedder.linear_2.{kind}"] = take(f"t_embedder.mlp.2.{kind}")
            out[f"{to}norm1.linear.{kind}"] = take(f"{src}adaLN_modulation.1.{kind}")
            q, k, v = take(f"{src}attn.qkv.{kind}").chunk(3, dim=0)
            out[f"{to}attn1.to_q.{kind}"], out[f"{to}attn1.to_k.{kind}"], out[f"{to}attn1.to_v.{kind}"] = q, k, v
            out[f"{to}attn1.to_out.0.{kind}"] = take(f"{src}attn.proj.{kind}")
            out[f"{to}ff.net.0.proj.{kind}"] = take(f"{src}mlp.fc1.{kind}")
            out[f"{to}ff.net.2.{kind}"] = take(f"{src}mlp.fc2.{kind}")
        out[f"{to}norm1.emb.class_embedder.embedding_table.weight"] = take("y_embedder.embedding_table.weight")
    extra = [k for k in state if k not in used]
    if extra:
        raise LitGenError(f"the DiT state dict has {len(extra)} tensor(s) this mapping does not know, e.g. {extra[0]}")
    return out


def import_dit(
    src: str | Path,
    out: str | Path,
    arch: str | None,
    vae: str | Path | None,
    heads: int | None = None,
    param_view: str = "native",
) -> dict[str, Any]:
    """Import the DiT ``.pt`` at ``src`` with the latent VAE folder ``vae`` into ``out`` (.safetensors)."""
    start = time.perf_counter()
    src = Path(src)
    state = read_dit_state(src)
    config = dit_config(state, arch, heads, src)
    if vae is None:
        raise LitGenError(
            "a DiT .pt denoises Stable Diffusion VAE latents: pass --vae FOLDER (an AutoencoderKL folder, e.g. "
            "stabilityai/sd-vae-ft-ema saved on disk)"
        )
    vae_dir = Path(vae).expanduser()
    if (vae_dir / "model_index.json").is_file() and (vae_dir / "vae").is_dir():
        vae_dir = vae_dir / "vae"  # a pipeline folder: its VAE
    if not (vae_dir / "config.json").is_file():
        raise LitGenError(f"--vae {vae} is no AutoencoderKL folder (no config.json)")
    vae_parts = read_vae(vae_dir.resolve())
    net = DiffusersNet("DiTTransformer2DModel", config, config["num_embeds_ada_norm"], timestep_freq_shift=0)
    load_weights(net, {f"model.{k}": v for k, v in map_state(state, config["num_layers"]).items()}, str(src))
    pos = state["pos_embed"].reshape(-1).float()
    table = net.model.pos_embed.pos_embed.reshape(-1).float()
    if pos.shape != table.shape or float((pos - table).abs().max()) > POS_EMBED_TOL:
        raise LitGenError(f"{src}: pos_embed is not the fixed 2-D sin-cos table of a DiT of this size")
    param = DiscreteVP(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, sigma_data=1.0)
    heads_used = config["num_attention_heads"]
    source = {"format": "dit", "path": str(src), "arch": arch, "heads": heads_used, "vae": str(vae_dir)}
    net = net.eval().requires_grad_(False)
    report = finish_import(out, net, param, config["sample_size"], source, vae_parts, param_view, start)
    report["source_parameters"] = sum(v.numel() for k, v in state.items() if k != "pos_embed")
    return report


@torch.no_grad()
def conformance(out: str | Path, src: str | Path, vae: str | Path | None, batch: int = 4, seed: int = 0) -> dict:
    """The imported file read back against the source: every mapped tensor bit-exact (no DiT code exists here to
    run the source network; the mapping's function is tested against DiT's equations in tests/test_import_dit.py),
    parameter counts (diffusers repeats the conditioning embedder per block), and the carried VAE's decode against
    diffusers' ``AutoencoderKL`` (``importers.diffusers._compare_vae``)."""
    from lit_gen.export import load_model
    from lit_gen.importers.diffusers import VAE_TOL, _compare_vae

    loaded = load_model(out)
    state = read_dit_state(Path(src))
    mapped = map_state(state, int(loaded.net.model.config.num_layers))
    mine = loaded.net.state_dict()
    worst = max(float((mine[f"model.{k}"].double() - v.double()).abs().max()) for k, v in mapped.items())
    vae_dir = Path(vae) / "vae" if (Path(vae) / "model_index.json").is_file() else Path(vae)
    report = {
        "parameters_lit_gen": sum(p.numel() for p in loaded.net.parameters()),
        "parameters_source": sum(v.numel() for k, v in state.items() if k != "pos_embed"),
        "tensors_mapped": len(mapped),
        "tensors_source": len(state),
        "weights_max_abs": worst,
        "vae_decode_max_abs_fp32": _compare_vae(loaded.data_info, vae_dir, batch, seed),
    }
    report["faithful"] = bool(worst == 0.0 and report["vae_decode_max_abs_fp32"] <= VAE_TOL)
    return report
