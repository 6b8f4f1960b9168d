"""`lit-gen import --format dit`: a facebookresearch DiT `.pt` state dict built here from DiT's documented key
structure (random weights, nothing downloaded) maps onto diffusers' DiTTransformer2DModel; the imported network
computes DiT's own forward pass (written below from the paper's equations and DiT's models.py facts: timestep
frequencies exp(−ln 10⁴·i/half) with [cos, sin], adaLN-Zero with LayerNorm ε 1e-6, fused qkv, tanh-GELU MLP, learned
σ channels), and bad input is one line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_gen.export import load_model
from lit_gen.importers.command import run_import
from tests.conftest import run_cli

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

HIDDEN, DEPTH, HEADS, PATCH, CH, SIDE, CLASSES = 16, 2, 2, 2, 4, 8, 10


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's / DiT's fixed 2-D sin-cos table [grid², dim]: first half the column coordinate, second the row."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


def dit_state_dict(
    learn_sigma: bool = True,
    hidden: int = HIDDEN,
    depth: int = DEPTH,
    patch: int = PATCH,
    side: int = SIDE,
    classes: int = CLASSES,
    ch: int = CH,
) -> dict[str, torch.Tensor]:
    """A DiT in facebookresearch/DiT's key layout (tiny by default), every tensor random (nothing zero-initialised).
    benchmarks/import_teachers.py writes the DiT-XL/2 size with it."""
    HIDDEN, DEPTH, PATCH, CH, SIDE, CLASSES = hidden, depth, patch, ch, side, classes  # noqa: N806
    gen = torch.Generator().manual_seed(0)
    out_ch = 2 * CH if learn_sigma else CH

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    state = {
        "x_embedder.proj.weight": r(HIDDEN, CH, PATCH, PATCH),
        "x_embedder.proj.bias": r(HIDDEN),
        "t_embedder.mlp.0.weight": r(HIDDEN, 256),
        "t_embedder.mlp.0.bias": r(HIDDEN),
        "t_embedder.mlp.2.weight": r(HIDDEN, HIDDEN),
        "t_embedder.mlp.2.bias": r(HIDDEN),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, HIDDEN),
        "pos_embed": torch.from_numpy(sincos_2d(HIDDEN, SIDE // PATCH)).float()[None],
        "final_layer.adaLN_modulation.1.weight": r(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": r(2 * HIDDEN),
        "final_layer.linear.weight": r(PATCH * PATCH * out_ch, HIDDEN),
        "final_layer.linear.bias": r(PATCH * PATCH * out_ch),
    }
    for n in range(DEPTH):
        state.update({
            f"blocks.{n}.attn.qkv.weight": r(3 * HIDDEN, HIDDEN), f"blocks.{n}.attn.qkv.bias": r(3 * HIDDEN),
            f"blocks.{n}.attn.proj.weight": r(HIDDEN, HIDDEN), f"blocks.{n}.attn.proj.bias": r(HIDDEN),
            f"blocks.{n}.mlp.fc1.weight": r(4 * HIDDEN, HIDDEN), f"blocks.{n}.mlp.fc1.bias": r(4 * HIDDEN),
            f"blocks.{n}.mlp.fc2.weight": r(HIDDEN, 4 * HIDDEN), f"blocks.{n}.mlp.fc2.bias": r(HIDDEN),
            f"blocks.{n}.adaLN_modulation.1.weight": r(6 * HIDDEN, HIDDEN),
            f"blocks.{n}.adaLN_modulation.1.bias": r(6 * HIDDEN),
        })  # fmt: skip
    return state


def dit_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int = HEADS
) -> torch.Tensor:
    """DiT's forward pass (Peebles & Xie 2023, Sec. 3.2, adaLN-Zero blocks), from its equations; the sizes are read
    from the tensors (benchmarks/import_teachers.py runs it at DiT-XL/2 size)."""
    HIDDEN, _, PATCH, _ = sd["x_embedder.proj.weight"].shape  # noqa: N806
    DEPTH, HEADS, SIDE = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), heads, x.shape[-1]  # noqa: N806
    b = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # fmt: skip
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def norm(v: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, (HIDDEN,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    for n in range(DEPTH):
        p = f"blocks.{n}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        qkv = F.linear(norm(h, shift_msa, scale_msa), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, HIDDEN)
        h = h + gate_msa[:, None] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.linear(norm(h, shift_mlp, scale_mlp), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        m = F.linear(F.gelu(m, approximate="tanh"), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + gate_mlp[:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)  # fmt: skip
    h = F.linear(norm(h, shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g, out_ch = SIDE // PATCH, h.shape[-1] // (PATCH * PATCH)
    h = h.reshape(b, g, g, PATCH, PATCH, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, out_ch, g * PATCH, g * PATCH)


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    from tests.test_import_latents import make_vae

    folder = tmp_path_factory.mktemp("dit_pt")
    state = dit_state_dict()
    torch.save(state, folder / "DiT-tiny.pt")
    make_vae().save_pretrained(folder / "vae")
    return folder / "DiT-tiny.pt", folder / "vae", state


def test_dit_pt_computes_dits_forward(dit_files: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """After import, the network's ε half equals DiT's own forward pass (≤ 1e-5), at several timesteps and labels
    including the null class; the mapping uses every tensor; the teacher is latent with DiT's DDPM schedule."""
    pt, vae, state = dit_files
    out = tmp_path / "dit.safetensors"
    report = run_import(pt, out, arch=None, heads=HEADS, vae=vae, check=True)
    assert report["check"]["faithful"] and report["check"]["weights_max_abs"] == 0.0
    assert report["check"]["tensors_source"] == len(state)
    model = load_model(out)
    assert model.data_info["kind"] == "latent" and model.data_info["shape"] == [CH, SIDE, SIDE]
    param = model.param
    assert (param.num_train_timesteps, param.beta_schedule, param.prediction_type) == (1000, "linear", "epsilon")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, CH, SIDE, SIDE, generator=gen)
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 9, CLASSES])  # CLASSES: the null row
    with torch.no_grad():
        expected = dit_forward(state, x, t, y)[:, :CH]
        mine = model.net(x, t, y)
    assert mine.shape == expected.shape and (mine - expected).abs().max() <= 1e-5
    # diffusers' default DiT timestep features (downscale_freq_shift 1) would differ: the setting matters
    for module in model.net.modules():
        if type(module).__name__ == "Timesteps":
            module.downscale_freq_shift = 1.0
    with torch.no_grad():
        assert (model.net(x, t, y) - expected).abs().max() > 1e-3
    picture = model.sample(2, steps=2, sampler="ddim")
    assert picture.shape == (2, 3, 2 * SIDE, 2 * SIDE)


def test_dit_bad_inputs_are_one_line(
    dit_files: tuple[Path, Path, dict[str, torch.Tensor]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    from tests.test_import_diffusers import _one_line_error

    pt, vae, state = dit_files
    out = tmp_path / "o.safetensors"
    assert "--arch DiT-S/8 has hidden size 384" in _one_line_error(
        capsys, "import", pt, "--out", out, "--arch", "DiT-S/8", "--vae", vae
    )
    assert "pass --arch" in _one_line_error(capsys, "import", pt, "--out", out, "--vae", vae)
    assert "unknown --arch" in _one_line_error(capsys, "import", pt, "--out", out, "--arch", "DiT-XXL/2")
    assert "pass --vae" in _one_line_error(capsys, "import", pt, "--out", out, "--heads", HEADS)
    bad = tmp_path / "extra.pt"
    torch.save({**state, "blocks.0.attn.q_norm.weight": torch.ones(8)}, bad)
    assert "does not know" in _one_line_error(capsys, "import", bad, "--out", out, "--heads", HEADS, "--vae", vae)
    shifted = tmp_path / "pos.pt"
    torch.save({**state, "pos_embed": state["pos_embed"] + 0.1}, shifted)
    assert "sin-cos" in _one_line_error(capsys, "import", shifted, "--out", out, "--heads", HEADS, "--vae", vae)
    not_dit = tmp_path / "other.pt"
    torch.save({"weight": torch.ones(2)}, not_dit)
    assert "is not a DiT state dict" in _one_line_error(capsys, "import", not_dit, "--out", out, "--heads", 2)
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    assert "is not a state dict" in _one_line_error(capsys, "import", not_state, "--out", out)
    assert not out.exists()


def test_dit_architecture_table() -> None:
    from lit_gen.importers.dit import ARCHS

    assert ARCHS["DiT-XL/2"] == (1152, 28, 16, 2) and ARCHS["DiT-S/8"] == (384, 12, 6, 8)
    assert ARCHS["DiT-B/4"] == (768, 12, 12, 4) and ARCHS["DiT-L/2"] == (1024, 24, 16, 2) and len(ARCHS) == 12


def test_cli_import_dit(dit_files: tuple[Path, Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    pt, vae, _ = dit_files
    run_cli("import", pt, "--out", tmp_path / "d.safetensors", "--heads", HEADS, "--vae", vae)
    run_cli("sample", "--ckpt", tmp_path / "d.safetensors", "--n", 2, "--steps", 2, "--out", tmp_path / "d.png")
    assert (tmp_path / "d.png").is_file()
