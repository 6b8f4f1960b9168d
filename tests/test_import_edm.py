"""`lit-gen import --format edm`: NVlabs EDM snapshots read without running the pickle.

The test writes a pickle in ``torch_utils.persistence``'s format itself (nothing downloaded, no NVlabs code): each
persistent object pickles as ``_reconstruct_persistent_obj(meta)``, ``meta = {type, version, module_src,
class_name, state}`` with ``state`` the module's ``__dict__`` (parameters as real ``nn.Parameter``s, plain
``torch.nn.ModuleDict`` containers), in EDM's SongUNet layout: ``enc``/``dec`` ModuleDicts named ``32x32_conv``,
``16x16_down``, ``16x16_block0``, ``8x8_in0``, ``32x32_aux_norm`` ..., sin/cos-flipped noise embedding, q/k/v
interleaved per channel, labels through a linear layer of one-hots. The weights come from a lit_gen UNet built with
EDM's architecture arguments, so the imported teacher must give the same D(x, σ)."""

from __future__ import annotations

import math
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_gen.diffusion.edm import EDM
from lit_gen.export import load_model
from lit_gen.nets.unet import UNet
from tests.conftest import run_cli

ARCH = dict(
    img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.13, embedding_type="positional", channel_mult_emb=4, adaptive_scale=False,
)  # fmt: skip
MODULE_SRC = "# training/networks.py of the snapshot: kept as text, never executed\n"


def _reconstruct_persistent_obj(meta):  # type: ignore[no-untyped-def]
    raise AssertionError("only used as the pickled reference; the importer must not call it")


@pytest.fixture
def persistence_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``torch_utils.persistence`` module for pickle.dump to reference (while the test writes the file)."""
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)


class Persistent(nn.Module):
    """Pickles like a ``persistence.persistent_class`` instance: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, module_src: str = MODULE_SRC, **attributes: object) -> None:
        super().__init__()
        self._class = class_name
        self._src = module_src
        for key, value in attributes.items():
            setattr(self, key, value)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        state = {k: v for k, v in self.__dict__.items() if k not in ("_class", "_src")}
        meta = dict(type="class", version=6, module_src=self._src, class_name=self._class, state=state)
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None)


def _layer(kind: str, **tensors: torch.Tensor) -> Persistent:
    layer = Persistent(kind)
    for name, value in tensors.items():
        if name == "resample_filter":
            layer.register_buffer(name, value)
        else:
            setattr(layer, name, nn.Parameter(value.clone()))
    if kind == "GroupNorm":
        channels = tensors["weight"].shape[0]
        layer.num_groups, layer.eps = min(32, channels // 4), 1e-6
    return layer


def _flip(v: torch.Tensor, dim: int) -> torch.Tensor:
    h = v.shape[dim] // 2
    return torch.cat([v.narrow(dim, h, h), v.narrow(dim, 0, h)], dim=dim)


def _edm_block(sd: dict[str, torch.Tensor], prefix: str, resample: bool) -> Persistent:
    block = Persistent("UNetBlock", skip_scale=math.sqrt(0.5))
    f = torch.ones(1, 1, 2, 2) / 4
    for part, kind in (("norm0", "GroupNorm"), ("conv0", "Conv2d"), ("affine", "Linear"), ("norm1", "GroupNorm"),
                       ("conv1", "Conv2d"), ("skip", "Conv2d"), ("norm2", "GroupNorm"), ("qkv", "Conv2d"),
                       ("proj", "Conv2d")):  # fmt: skip
        if f"{prefix}.{part}.weight" not in sd:
            continue
        w, b = sd[f"{prefix}.{part}.weight"], sd[f"{prefix}.{part}.bias"]
        if part == "qkv":  # EDM: channel c·3 + j; lit_gen: j·C + c
            c = w.shape[0] // 3
            w = w.reshape(3, c, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
            b = b.reshape(3, c).t().reshape(-1)
        extra = {"resample_filter": f} if resample and part in ("conv0", "skip") else {}
        setattr(block, part, _layer(kind, weight=w, bias=b, **extra))
    return block


def edm_snapshot(
    path: Path, net: UNet, label_dim: int, module_src: str = MODULE_SRC, extra: object = None, arch: dict | None = None
) -> None:
    """Write ``net`` as an EDM network-snapshot pickle (EDMPrecond(SongUNet DDPM++)) in the persistence format,
    with SongUNet's module names (``{res}x{res}_conv``, ``_down``, ``_block{i}``, ``_in0``/``_in1``, ``_up``,
    ``_aux_norm``/``_aux_conv``) in its construction order."""
    arch = dict(ARCH if arch is None else arch)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    kwargs = {k: v for k, v in arch.items() if k not in ("adaptive_scale", "channel_mult_emb")}
    kwargs.update(label_dim=label_dim, augment_dim=9, encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1])  # fmt: skip
    mc, mult, res0, nb = arch["model_channels"], arch["channel_mult"], arch["img_resolution"], arch["num_blocks"]
    model = Persistent("SongUNet", module_src, _init_args=(), _init_kwargs=kwargs, label_dropout=0)
    model.map_noise = Persistent("PositionalEmbedding", num_channels=mc, max_positions=10000, endpoint=True)
    if label_dim:
        table = _flip(sd["map_label.table.weight"], 1)  # [L + 1, C] in EDM's (sin, cos) order
        bias = table[label_dim]
        weight = ((table[:label_dim] - bias) / math.sqrt(label_dim)).t()
        model.map_label = _layer("Linear", weight=weight, bias=bias)
    model.map_augment = _layer("Linear", weight=torch.randn(mc, 9))  # training-only: unused at sampling
    model.map_layer0 = _layer("Linear", weight=_flip(sd["map_layer0.weight"], 1), bias=sd["map_layer0.bias"])
    model.map_layer1 = _layer("Linear", weight=sd["map_layer1.weight"], bias=sd["map_layer1.bias"])
    model.enc = nn.ModuleDict()
    model.enc[f"{res0}x{res0}_conv"] = _layer("Conv2d", weight=sd["conv_in.weight"], bias=sd["conv_in.bias"])
    enc_names = []
    for level in range(len(mult)):
        res = res0 >> level
        enc_names += ([f"{res}x{res}_down"] if level else []) + [f"{res}x{res}_block{i}" for i in range(nb)]
    for i, name in enumerate(enc_names):
        model.enc[name] = _edm_block(sd, f"enc.{i}", resample="down" in name)
    model.dec = nn.ModuleDict()
    low = res0 >> (len(mult) - 1)
    model.dec[f"{low}x{low}_in0"] = _edm_block(sd, "mid.0", False)
    model.dec[f"{low}x{low}_in1"] = _edm_block(sd, "mid.1", False)
    dec_names = []
    for level in reversed(range(len(mult))):
        res = res0 >> level
        dec_names += ([f"{res}x{res}_up"] if level < len(mult) - 1 else []) + [
            f"{res}x{res}_block{i}" for i in range(nb + 1)
        ]
    for i, name in enumerate(dec_names):
        model.dec[name] = _edm_block(sd, f"dec.{i}", resample="up" in name)
    model.dec[f"{res0}x{res0}_aux_norm"] = _layer("GroupNorm", weight=sd["out_norm.weight"], bias=sd["out_norm.bias"])
    model.dec[f"{res0}x{res0}_aux_conv"] = _layer("Conv2d", weight=sd["out_conv.weight"], bias=sd["out_conv.bias"])
    precond_kwargs = dict(img_resolution=res0, img_channels=arch["in_channels"], label_dim=label_dim, use_fp16=False)
    precond = Persistent("EDMPrecond", _init_args=(), _init_kwargs=precond_kwargs, img_resolution=res0,
                         img_channels=arch["in_channels"], label_dim=label_dim, use_fp16=False, sigma_min=0.0,
                         sigma_max=float("inf"), sigma_data=0.5)  # fmt: skip
    precond.model = model
    loss = Persistent("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    top = dict(ema=precond, loss_fn=loss, augment_pipe=None, dataset_kwargs=dict(path="cifar10-32x32.zip"))
    if extra is not None:
        top["extra"] = extra
    with open(path, "wb") as handle:
        pickle.dump(top, handle)


def random_unet(num_classes: int) -> UNet:
    net = UNet(**ARCH, num_classes=num_classes)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


@pytest.mark.parametrize("label_dim", [0, 4])
def test_edm_snapshot_imports_with_the_same_denoiser(tmp_path: Path, persistence_module: None, label_dim: int) -> None:
    net = random_unet(label_dim)
    src, out = tmp_path / "network-snapshot.pkl", tmp_path / "t.safetensors"
    marker = tmp_path / "ran"
    edm_snapshot(src, net, label_dim, module_src=f"open({str(marker)!r}, 'w').write('module_src was executed')\n")
    run_cli("import", src, "--out", out, "--check")
    assert not marker.exists()  # the snapshot's source code is data, never run
    model = load_model(out)
    assert isinstance(model.param, EDM) and model.param.sigma_data == 0.5 and model.num_classes == label_dim
    assert model.net.init_args == {**ARCH, "num_classes": label_dim}
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1]) if label_dim else None
    param = EDM()
    net.double()
    model.net.double()
    for sigma in (0.002, 0.5, 5.0, 80.0):
        s = torch.full((3,), sigma, dtype=torch.float64)
        for label in (labels, None):
            expected = param.denoise(net, x * max(sigma, 1.0), s, label)
            got = model.denoiser()(x * max(sigma, 1.0), s, label)
            assert (got - expected).abs().max() <= 1e-10
    check = (tmp_path / "t.safetensors.check.json").read_text()
    assert '"faithful": true' in check


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


class EvalExploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize(("exploit", "named"), [(Exploit, "posix.system"), (EvalExploit, "builtins.eval")])
def test_hostile_pickles_are_refused_and_run_nothing(
    tmp_path: Path, persistence_module: None, capsys: pytest.CaptureFixture, exploit: type, named: str
) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "network-snapshot.pkl"
    edm_snapshot(src, random_unet(0), 0, extra=exploit(marker))
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", tmp_path / "t.safetensors")
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert err.count("\n") == 0 and "refusing" in err and named in err, err
    assert not (tmp_path / "t.safetensors").exists()


def test_edm_networks_lit_gen_has_no_counterpart_for_are_one_line(
    tmp_path: Path, persistence_module: None, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "ncsnpp.pkl"
    edm_snapshot(src, random_unet(0), 0)
    # an NCSN++ snapshot: same structure, Fourier embedding in the recorded architecture
    model = Persistent("SongUNet", _init_args=(), _init_kwargs=dict(img_resolution=8, in_channels=3, out_channels=3,
                       embedding_type="fourier", encoder_type="residual", decoder_type="skip",
                       resample_filter=[1, 3, 3, 1], channel_mult_noise=2))  # fmt: skip
    precond = Persistent("EDMPrecond", sigma_data=0.5)
    precond.model = model
    with open(src, "wb") as handle:
        pickle.dump(dict(ema=precond), handle)
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", tmp_path / "t.safetensors")
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "DDPM++" in err and "embedding_type" in err, err
    with open(src, "wb") as handle:
        pickle.dump(dict(ema=Persistent("VPPrecond")), handle)
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", tmp_path / "t.safetensors")
    assert "EDMPrecond" in capsys.readouterr().err
    src.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", tmp_path / "t.safetensors")
    assert "cannot read" in capsys.readouterr().err
