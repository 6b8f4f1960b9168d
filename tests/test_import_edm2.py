"""`lit-gen import --format edm2`: NVlabs EDM2 snapshots (Karras et al. 2024) read without running the pickle.

The test writes the pickle itself in ``torch_utils.persistence``'s format (nothing downloaded, no NVlabs code): a
``dnnlib.EasyDict(encoder, dataset_kwargs, loss_fn, ema)`` whose ``ema`` is a ``Precond`` record holding a ``UNet``
record in EDM2's layout (``enc``/``dec`` ModuleDicts named ``8x8_conv``, ``4x4_down``, ``8x8_block0``, ``4x4_in0``,
... ; ``Block`` and ``MPConv`` records with EDM2's attributes) and the log-variance head, every tensor float16 as
EDM2's snapshots are. The imported denoiser is compared with EDM2's forward pass written below, straight from the
paper's equations and networks_edm2.py's structure, in float64 over the pickle's own tensors."""

from __future__ import annotations

import json
import math
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_gen.diffusion.edm import EDM
from lit_gen.export import load_model
from lit_gen.importers.command import run_import
from lit_gen.nets.edm2 import EDM2UNet, MPConv, mp_cat, mp_silu, mp_sum, normalize
from tests.conftest import REPO, run_cli
from tests.test_import_edm import Exploit, Persistent, persistence_module  # noqa: F401 - the fixture is used

ARCH = dict(
    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.0,
)  # fmt: skip
RES, LOGVAR = 8, 8


class EasyDict(dict):
    """dnnlib.util.EasyDict's pickled shape: a dict subclass (attribute access only)."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: object) -> None:
        self[name] = value


@pytest.fixture
def dnnlib_module(monkeypatch: pytest.MonkeyPatch, persistence_module: None) -> None:  # noqa: F811
    """``dnnlib.util.EasyDict`` for pickle.dump to reference (EDM2 snapshots are EasyDicts)."""
    package, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    EasyDict.__module__ = "dnnlib.util"
    util.EasyDict = EasyDict
    package.util = util
    monkeypatch.setitem(sys.modules, "dnnlib", package)
    monkeypatch.setitem(sys.modules, "dnnlib.util", util)


# ------------------------------------------------------------------------------------ EDM2's documented layout
def layout(label_dim: int, channels: int, arch: dict | None = None, res0: int = RES) -> tuple[list, list, int, int]:
    """EDM2 UNet's blocks in construction order: (name, kind, cin, cout, flavor, mode, heads) for enc and dec, and
    the noise/embedding widths (networks_edm2.py UNet.__init__)."""
    a = {**ARCH, **(arch or {})}
    mc, mult = a["model_channels"], a["channel_mult"]
    cblock = [mc * m for m in mult]
    cnoise, cemb = cblock[0], max(cblock)
    enc, dec = [], []
    cout = channels + 1
    for level, ch in enumerate(cblock):
        res = res0 >> level
        if level == 0:
            enc.append((f"{res}x{res}_conv", "conv", cout, ch, None, None, 0))
            cout = ch
        else:
            enc.append((f"{res}x{res}_down", "block", cout, cout, "enc", "down", 0))
        for idx in range(a["num_blocks"]):
            heads = ch // a["channels_per_head"] if res in a["attn_resolutions"] else 0
            enc.append((f"{res}x{res}_block{idx}", "block", cout, ch, "enc", "keep", heads))
            cout = ch
    skips = [e[3] for e in enc]
    for level, ch in reversed(list(enumerate(cblock))):
        res = res0 >> level
        if level == len(cblock) - 1:
            dec.append((f"{res}x{res}_in0", "block", cout, cout, "dec", "keep", cout // a["channels_per_head"]))
            dec.append((f"{res}x{res}_in1", "block", cout, cout, "dec", "keep", 0))
        else:
            dec.append((f"{res}x{res}_up", "block", cout, cout, "dec", "up", 0))
        for idx in range(a["num_blocks"] + 1):
            cin = cout + skips.pop()
            heads = ch // a["channels_per_head"] if res in a["attn_resolutions"] else 0
            dec.append((f"{res}x{res}_block{idx}", "block", cin, ch, "dec", "keep", heads))
            cout = ch
    return enc, dec, cnoise, cemb


def _mpconv(gen: torch.Generator, cin: int, cout: int, kernel: list[int]) -> Persistent:
    layer = Persistent("MPConv", out_channels=cout)
    w = torch.randn(cout, cin, *kernel, generator=gen)
    layer.weight = nn.Parameter(normalize(w))  # a trained EDM2 net's weights are force-normalised
    return layer


def _gain(gen: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.rand([], generator=gen) * 0.5 + 0.2)  # trained gains are nonzero


def edm2_precond(
    label_dim: int, channels: int, seed: int = 0, arch: dict | None = None, res: int = RES, logvar: int = LOGVAR
) -> Persistent:
    """A Precond record tree of EDM2's structure with random (force-normalised) weights, float16
    (benchmarks/import_edm2.py writes EDM2-S ImageNet-512 with it)."""
    a = {**ARCH, **(arch or {})}
    gen = torch.Generator().manual_seed(seed)
    enc, dec, cnoise, cemb = layout(label_dim, channels, arch, res)
    unet = Persistent("UNet", _init_args=(), _init_kwargs={}, label_balance=0.5, concat_balance=0.5)
    unet.out_gain = _gain(gen)
    fourier = Persistent("MPFourier")
    fourier.register_buffer("freqs", 2 * np.pi * torch.randn(cnoise, generator=gen))
    fourier.register_buffer("phases", 2 * np.pi * torch.rand(cnoise, generator=gen))
    unet.emb_fourier = fourier
    unet.emb_noise = _mpconv(gen, cnoise, cemb, [])
    unet.emb_label = _mpconv(gen, label_dim, cemb, []) if label_dim else None
    for part, blocks in (("enc", enc), ("dec", dec)):
        container = nn.ModuleDict()
        for name, kind, cin, cout, flavor, mode, heads in blocks:
            if kind == "conv":
                container[name] = _mpconv(gen, cin, cout, [3, 3])
                continue
            block = Persistent("Block", out_channels=cout, flavor=flavor, resample_filter=[1, 1],
                               resample_mode=mode, num_heads=heads, dropout=0.0, res_balance=0.3, attn_balance=0.3,
                               clip_act=256)  # fmt: skip
            block.emb_gain = _gain(gen)
            block.conv_res0 = _mpconv(gen, cout if flavor == "enc" else cin, cout, [3, 3])
            block.emb_linear = _mpconv(gen, cemb, cout, [])
            block.conv_res1 = _mpconv(gen, cout, cout, [3, 3])
            block.conv_skip = _mpconv(gen, cin, cout, [1, 1]) if cin != cout else None
            block.attn_qkv = _mpconv(gen, cout, 3 * cout, [1, 1]) if heads else None
            block.attn_proj = _mpconv(gen, cout, cout, [1, 1]) if heads else None
            container[name] = block
        setattr(unet, part, container)
    unet.out_conv = _mpconv(gen, cout, channels, [3, 3])
    kwargs = dict(img_resolution=res, img_channels=channels, label_dim=label_dim, use_fp16=True,
                  logvar_channels=logvar, **a)  # fmt: skip
    precond = Persistent("Precond", _init_args=(), _init_kwargs=kwargs, img_resolution=res, img_channels=channels,
                         label_dim=label_dim, use_fp16=True, sigma_data=0.5)  # fmt: skip
    precond.unet = unet
    head = Persistent("MPFourier")
    head.register_buffer("freqs", 2 * np.pi * torch.randn(logvar, generator=gen))
    head.register_buffer("phases", 2 * np.pi * torch.rand(logvar, generator=gen))
    precond.logvar_fourier = head
    precond.logvar_linear = _mpconv(gen, logvar, 1, [])
    return precond.half()  # EDM2's snapshots: copy.deepcopy(ema).to(torch.float16)


RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # StabilityVAEEncoder's defaults


def write_snapshot(path: Path, precond: Persistent, latent: bool = False, extra: object = None) -> None:
    """An EDM2 snapshot: EasyDict(encoder, dataset_kwargs, loss_fn, ema) as training_loop.py pickles it."""
    if latent:
        encoder = Persistent("StabilityVAEEncoder", vae_name="stabilityai/sd-vae-ft-mse", batch_size=8, _vae=None)
        encoder.scale = np.float32(0.5) / np.float32(RAW_STD)
        encoder.bias = np.float32(0) - np.float32(RAW_MEAN) * encoder.scale
    else:
        encoder = Persistent("StandardRGBEncoder")
    data = EasyDict(encoder=encoder, loss_fn=Persistent("EDM2Loss", P_mean=-0.8, P_std=1.6, sigma_data=0.5))
    data.dataset_kwargs = EasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip", use_labels=True)
    data.ema = precond
    if extra is not None:
        data.extra = extra
    with open(path, "wb") as handle:
        pickle.dump(data, handle)


# -------------------------------------------------------- EDM2's forward pass, from its equations (float64)
def _norm(x: torch.Tensor, dim: object = None) -> torch.Tensor:
    dims = list(range(1, x.ndim)) if dim is None else dim
    n = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    return x / (1e-4 + n * math.sqrt(n.numel() / x.numel()))


def _conv(sd: dict, name: str, x: torch.Tensor, gain: object = 1.0) -> torch.Tensor:
    w = sd[f"{name}.weight"]
    w = _norm(w) * (gain / math.sqrt(w[0].numel()))  # eq. 47 + weight normalisation
    return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596  # eq. 81


def _sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)  # eq. 88


def _cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))  # eq. 103
    return torch.cat([c / math.sqrt(na) * (1 - t) * a, c / math.sqrt(nb) * t * b], dim=1)


def _fourier(sd: dict, name: str, c: torch.Tensor) -> torch.Tensor:
    return torch.cos(c[:, None] * sd[f"{name}.freqs"][None] + sd[f"{name}.phases"][None]) * math.sqrt(2)  # eq. 75


def _block(sd: dict, p: str, spec: tuple, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    _, _, cin, cout, flavor, mode, heads = spec
    if mode == "down":
        x = F.avg_pool2d(x, 2)  # the [1, 1] filter
    elif mode == "up":
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if flavor == "enc":
        if cin != cout:
            x = _conv(sd, f"{p}.conv_skip", x)
        x = _norm(x, dim=1)
    y = _conv(sd, f"{p}.conv_res0", _silu(x))
    c = _conv(sd, f"{p}.emb_linear", emb, gain=sd[f"{p}.emb_gain"]) + 1
    y = _conv(sd, f"{p}.conv_res1", _silu(y * c[:, :, None, None]))
    if flavor == "dec" and cin != cout:
        x = _conv(sd, f"{p}.conv_skip", x)
    x = _sum(x, y, 0.3)
    if heads:
        n, ch, h, w = x.shape
        y = _conv(sd, f"{p}.attn_qkv", x).reshape(n, heads, -1, 3, h * w)
        q, k, v = _norm(y, dim=2).unbind(3)
        a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        y = _conv(sd, f"{p}.attn_proj", torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, ch, h, w))
        x = _sum(x, y, 0.3)
    return x.clip(-256, 256)


def edm2_denoiser(
    sd: dict,
    label_dim: int,
    x: torch.Tensor,
    sigma: torch.Tensor,
    onehot: torch.Tensor | None,
    arch: dict | None = None,
) -> torch.Tensor:
    """EDM2's Precond.forward + UNet.forward (networks_edm2.py) in x's dtype, c_noise rounded to float32 as EDM2's."""
    enc, dec, _, _ = layout(label_dim, x.shape[1], arch, x.shape[-1])
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (0.25 + s**2).sqrt()
    c_noise = (sigma.float().log() / 4).to(x.dtype)
    emb = _conv(sd, "unet.emb_noise", _fourier(sd, "unet.emb_fourier", c_noise))
    if label_dim:
        vec = torch.zeros(x.shape[0], label_dim, dtype=x.dtype) if onehot is None else onehot.to(x.dtype)
        emb = _sum(emb, _conv(sd, "unet.emb_label", vec * math.sqrt(label_dim)), 0.5)
    emb = _silu(emb)
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for spec in enc:
        h = (
            _conv(sd, f"unet.enc.{spec[0]}", h)
            if spec[1] == "conv"
            else _block(sd, f"unet.enc.{spec[0]}", spec, h, emb)
        )
        skips.append(h)
    for spec in dec:
        if "block" in spec[0]:
            h = _cat(h, skips.pop())
        h = _block(sd, f"unet.dec.{spec[0]}", spec, h, emb)
    f = _conv(sd, "unet.out_conv", h, gain=sd["unet.out_gain"])
    return c_skip * x + c_out * f


def source_tensors(precond: Persistent) -> dict[str, torch.Tensor]:
    return {k: v.detach().double() for k, v in precond.state_dict().items()}


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("label_dim", [0, 4])
def test_edm2_snapshot_imports_with_edm2s_denoiser(tmp_path: Path, dnnlib_module: None, label_dim: int) -> None:
    precond = edm2_precond(label_dim, 3)
    src, out = tmp_path / "edm2-img64-xs-0134217-0.100.pkl", tmp_path / "t.safetensors"
    marker = tmp_path / "ran"
    precond.unet._src = f"open({str(marker)!r}, 'w').write('module_src was executed')\n"
    write_snapshot(src, precond)
    run_cli("import", src, "--out", out, "--check")  # --format auto: the 'ema' class says edm2
    assert not marker.exists()
    check = json.loads((tmp_path / "t.safetensors.check.json").read_text())
    assert (
        check["faithful"] and check["weights_max_abs"] == 0.0 and check["elements_source"] == check["elements_lit_gen"]
    )
    model = load_model(out)
    assert isinstance(model.net, EDM2UNet) and model.num_classes == label_dim
    assert isinstance(model.param, EDM) and model.param.sigma_data == 0.5
    assert (model.param.p_mean, model.param.p_std) == (-0.8, 1.6)  # from the EDM2Loss record
    assert model.description["sampling"] == {"sampler": "heun", "steps": 32}
    assert model.data_info["kind"] == "image" and model.data_info["shape"] == [3, RES, RES]
    sd = source_tensors(precond)
    net = model.net.double()
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(3, 3, RES, RES, generator=gen, dtype=torch.float64) * 0.5
    n = torch.randn(3, 3, RES, RES, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, label_dim]) if label_dim else None  # index label_dim: lit_gen's NULL row
    onehot = None
    if label_dim:
        onehot = torch.zeros(3, label_dim, dtype=torch.float64)
        onehot[0, 0], onehot[1, 3] = 1.0, 1.0  # NULL = EDM2's zero class vector
    for sigma in (0.002, 0.3, 2.0, 80.0):
        s = torch.full((3,), sigma, dtype=torch.float64)
        x = y + sigma * n
        expected = edm2_denoiser(sd, label_dim, x, s, onehot)
        got = model.param.denoise(net, x, s, labels)
        assert (got - expected).abs().max() <= 1e-5, sigma
        if label_dim:
            none = model.param.denoise(net, x, s, None)  # label=None: EDM2's zero vector too
            assert (none - edm2_denoiser(sd, label_dim, x, s, None)).abs().max() <= 1e-5
            assert (net(x, s.log() / 4, onehot) - net(x, s.log() / 4, labels)).abs().max() == 0  # class vectors
    # a wrong balance is seen: the comparison is sensitive to the details
    next(iter(net.dec.values())).res_balance = 0.5
    x = y + 2.0 * n
    s = torch.full((3,), 2.0, dtype=torch.float64)
    assert (model.param.denoise(net, x, s, labels) - edm2_denoiser(sd, label_dim, x, s, onehot)).abs().max() > 1e-3
    # the log-variance head: logvar_linear(MPFourier(c_noise))
    c = (s.float().log() / 4).double()
    expected_logvar = _conv(sd, "logvar_linear", _fourier(sd, "logvar_fourier", c)).reshape(-1)
    assert (net.logvar(c) - expected_logvar).abs().max() <= 1e-6


def test_magnitude_preserving_layers_keep_unit_magnitude() -> None:
    """EDM2's invariants (Sec. 2.4-2.5, eq. 47, 81, 88, 103): unit-variance inputs give unit-magnitude outputs; the
    weight used at inference is normalised per output channel; forced normalisation rewrites it in training only."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, 8, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(64, 128, 8, 8, generator=gen, dtype=torch.float64)

    def rms(t: torch.Tensor) -> float:
        return float(t.square().mean().sqrt())

    assert abs(rms(mp_silu(a)) - 1) < 0.01
    for t in (0.3, 0.5, 0.8):
        assert abs(rms(mp_sum(a, torch.randn(a.shape, generator=gen, dtype=torch.float64), t)) - 1) < 0.01
        assert abs(rms(mp_cat(a, b, t=t)) - 1) < 0.01
        assert abs(rms(mp_sum(a, a, t)) - 1 / math.sqrt((1 - t) ** 2 + t**2)) < 0.01  # independence matters
    conv = MPConv(256, 32, [3, 3]).double()
    with torch.no_grad():
        conv.weight.mul_(torch.rand(32, 1, 1, 1, generator=gen, dtype=torch.float64) * 5 + 0.5)  # rows of any size
    w = conv.effective_weight().reshape(32, -1)
    assert (w.norm(dim=1) - 1).abs().max() < 1e-3  # ‖normalize(w)/√fan_in‖ = 1 − O(ε)
    before = conv.weight.detach().clone()
    with torch.no_grad():
        conv.eval()(a[:4])
        assert torch.equal(conv.weight, before)  # inference: the stored weight is left alone
        assert abs(rms(conv(a)[..., 1:-1, 1:-1]) - 1) < 0.02  # unit-variance in, unit magnitude out (eq. 47;
        # the border sees zero padding)
        conv.train()(a[:4])
    rows = conv.weight.reshape(32, -1).norm(dim=1) / math.sqrt(256 * 9)
    assert (rows - 1).abs().max() < 1e-3 and not torch.equal(conv.weight, before)  # forced normalisation
    assert torch.allclose(normalize(before), conv.weight, atol=1e-12)


def test_edm2_net_contract() -> None:
    """A fresh EDM2UNet returns F = 0 (out_gain = 0); NULL and None labels are the zero class vector; a net with the
    guidance input starts equal to one without; features / feature_levels have the documented shapes."""
    torch.manual_seed(0)
    net = EDM2UNet(RES, 3, num_classes=4, logvar_channels=LOGVAR, **ARCH).eval()
    x, c = torch.randn(2, 3, RES, RES), torch.tensor([-1.0, 0.5])
    assert net(x, c, torch.tensor([0, 1])).abs().max() == 0
    with torch.no_grad():
        net.out_gain.fill_(0.7)
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                p.fill_(0.3)
        none, null = net(x, c, None), net(x, c, torch.tensor([4, 4]))
        assert none.abs().max() > 0 and torch.equal(none, null)
        guided = EDM2UNet(RES, 3, num_classes=4, logvar_channels=LOGVAR, guidance_embed=True, **ARCH).eval()
        missing, _ = guided.load_state_dict(net.state_dict(), strict=False)
        assert all(k.startswith("map_guide.") for k in missing)
        assert torch.equal(
            guided(x, c, torch.tensor([1, 2]), c_guide=torch.tensor([2.0, 3.0])), net(x, c, torch.tensor([1, 2]))
        )
        assert net.features(x, c).shape == (2, net.feature_dim, RES // 2, RES // 2)
        assert [t.shape[1:] for t in net.feature_levels(x, c)] == [(16, RES, RES), (32, RES // 2, RES // 2)]


def test_hostile_edm2_pickles_are_refused_and_run_nothing(
    tmp_path: Path, dnnlib_module: None, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    src, out = tmp_path / "edm2.pkl", tmp_path / "t.safetensors"
    write_snapshot(src, edm2_precond(0, 3), extra=Exploit(marker))
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", out, "--format", "edm2")
    err = capsys.readouterr().err.strip()
    assert not marker.exists() and err.count("\n") == 0 and "refusing" in err and "posix.system" in err, err
    write_snapshot(src, edm2_precond(0, 3), extra=torch.nn.Linear(2, 2))  # a plain module class: not allowed
    with pytest.raises(SystemExit):
        run_cli("import", src, "--out", out, "--format", "edm2")
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torch.nn.modules.linear.Linear" in err, err
    assert not out.exists()


def _one_line(capsys: pytest.CaptureFixture, *args: object) -> str:
    with pytest.raises(SystemExit):
        run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_edm2_bad_inputs_are_one_line(tmp_path: Path, dnnlib_module: None, capsys: pytest.CaptureFixture) -> None:
    from tests.test_import_edm import edm_snapshot, random_unet

    out = tmp_path / "t.safetensors"
    edm = tmp_path / "edm.pkl"
    edm_snapshot(edm, random_unet(0), 0)
    assert "pass --format edm" in _one_line(capsys, "import", edm, "--out", out, "--format", "edm2")
    src = tmp_path / "edm2.pkl"
    write_snapshot(src, edm2_precond(0, 3))
    assert "pass --format edm2" in _one_line(capsys, "import", src, "--out", out, "--format", "edm")
    assert "takes no --vae" in _one_line(capsys, "import", src, "--out", out, "--vae", tmp_path)
    with open(src, "wb") as handle:
        pickle.dump(EasyDict(encoder=Persistent("StandardRGBEncoder")), handle)
    assert "no 'ema' network" in _one_line(capsys, "import", src, "--out", out, "--format", "edm2")
    latent = tmp_path / "latent.pkl"
    write_snapshot(latent, edm2_precond(0, 4), latent=True)
    assert "pass --vae" in _one_line(capsys, "import", latent, "--out", out)
    odd = edm2_precond(0, 3)
    odd._init_kwargs = {**odd._init_kwargs, "attn_kernel": 3}
    write_snapshot(src, odd)
    assert "'attn_kernel'" in _one_line(capsys, "import", src, "--out", out)
    src.write_bytes(b"\x80\x04truncated")
    assert "cannot read EDM2 pickle" in _one_line(capsys, "import", src, "--out", out, "--format", "edm2")
    assert not out.exists()


def test_edm2_latent_teacher_carries_the_vae_and_edm2s_normalisation(
    tmp_path: Path, dnnlib_module: None, capsys: pytest.CaptureFixture
) -> None:
    """An ImageNet-512-style snapshot (StabilityVAEEncoder, 4-channel latents) imports with --vae: the teacher carries
    the VAE and EDM2's per-channel latent map on [0, 1] pixels; it decodes as EDM2's encoder does (the conformance
    report compares with diffusers' AutoencoderKL), `lit-gen shards --encode TEACHER` writes EDM2's latents, and
    `lit-gen sample` decodes a PNG."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    from lit_gen.latents import build_vae, encode_images, read_vae_source
    from tests.test_import_latents import make_vae

    vae = make_vae()
    vae.save_pretrained(tmp_path / "vae")
    src, out = tmp_path / "edm2-img512.pkl", tmp_path / "teacher.safetensors"
    write_snapshot(src, edm2_precond(4, 4, seed=1), latent=True)
    report = run_import(src, out, vae=tmp_path / "vae", check=True)
    assert report["check"]["faithful"] and report["check"]["vae_decode_max_abs_fp32"] <= 1e-3
    model = load_model(out)
    record = model.data_info["vae"]
    scale = [0.5 / s for s in RAW_STD]
    assert np.allclose(record["scaling_factor"], scale, rtol=1e-6) and record["pixel_range"] == [0.0, 1.0]
    assert np.allclose(record["shift_factor"], RAW_MEAN, rtol=1e-5)  # −bias/scale = raw_mean (final_mean 0)
    images = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_cli("shards", tmp_path / "images.npy", "--out", tmp_path / "shards", "--encode", out, "--encode-mode", "mean",
            "--no-progress")  # fmt: skip
    info = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert info["vae"]["pixel_range"] == [0.0, 1.0] and info["vae"]["scaling_factor"] == record["scaling_factor"]
    config, tensors, _ = read_vae_source(out)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mine = encode_images(build_vae(config, tensors, "vae"), info["vae"], pixels)
    with torch.no_grad():  # EDM2: mean of E(x / 255), times scale, plus bias, per channel
        mean = vae.eval().encode(pixels / 255).latent_dist.mean
    s = torch.tensor(scale).reshape(1, -1, 1, 1)
    expected = mean * s + (-torch.tensor(RAW_MEAN).reshape(1, -1, 1, 1) * s)
    assert (mine - expected).abs().max() <= 1e-4
    run_cli("sample", "--ckpt", out, "--n", 2, "--steps", 2, "--label", 1, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("recipe", [pytest.param("tract", marks=pytest.mark.slow), "fdistill"])
def test_distill_an_imported_edm2_teacher(tmp_path: Path, dnnlib_module: None, recipe: str) -> None:
    """TRACT / f-distill train a few steps from the imported EDM2 teacher (toy-sized, pixels) and the student
    samples."""
    src, teacher = tmp_path / "edm2.pkl", tmp_path / "teacher.safetensors"
    write_snapshot(src, edm2_precond(0, 3))
    run_import(src, teacher)
    images = (np.random.default_rng(0).random((32, RES, RES, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_cli("shards", tmp_path / "images.npy", "--out", tmp_path / "shards", "--no-progress")
    extra = (
        ["--model.init_args.schedule", "[4, 1]", "--model.init_args.steps_per_phase", "3"] if recipe == "tract" else []
    )
    root = tmp_path / "run"
    run_cli(
        "fit", "-c", REPO / f"recipes/digits/{recipe}.yaml", "--model.init_args.teacher", teacher,
        "--data.init_args.shards", tmp_path / "shards", "--data.init_args.batch_size", 4,
        "--trainer.default_root_dir", root, "--trainer.max_steps", 3, "--trainer.enable_progress_bar", "false",
        *extra,
    )  # fmt: skip
    ckpt = root / "checkpoints" / "last.ckpt"
    student = load_model(ckpt)
    assert isinstance(student.net, EDM2UNet) and student.description["method"] != "import"
    run_cli("sample", "--ckpt", ckpt, "--n", 2, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()
