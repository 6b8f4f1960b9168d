"""The contract every network in lit_gen.nets honours (UNet, DiT, MLPDenoiser), on tiny configurations."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from lit_gen import spec
from lit_gen.nets import DiT, MLPDenoiser, UNet

B = 4
NUM_CLASSES = 3


@dataclass(frozen=True)
class Case:
    make: Callable[..., nn.Module]
    x_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]  # without the batch dimension
    feature_site: tuple[str, str]  # ("output" | "input", submodule name) where forward computes the features
    output_layers: tuple[str, ...]  # the zero-initialised layers that produce F


def _unet(**kw) -> UNet:
    args = dict(img_resolution=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1)
    return UNet(**{**args, "attn_resolutions": (4,), **kw})


def _dit(**kw) -> DiT:
    return DiT(**{**dict(img_resolution=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2), **kw})


def _mlp(**kw) -> MLPDenoiser:
    return MLPDenoiser(**{**dict(dim=2, hidden=32, depth=2, emb_dim=16), **kw})


CASES = {
    "unet": Case(_unet, (1, 8, 8), (32, 4, 4), ("output", "mid.1"), ("out_conv",)),
    "dit": Case(_dit, (1, 8, 8), (16, 32), ("output", "blocks.1"), ("final_linear",)),
    "mlp": Case(_mlp, (2,), (32,), ("input", "proj_out"), ("proj_out",)),
}
names = pytest.mark.parametrize("name", list(CASES))


@torch.no_grad()
def perturb(net: nn.Module, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter, so zero-initialised layers (output, adaLN gates) no longer block signals."""
    for p in net.parameters():
        p.add_(scale * torch.randn_like(p))
    return net


def inputs(name: str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *CASES[name].x_shape, generator=g)
    c_noise = torch.rand(B, generator=g) * 2.7 - 1.6  # ln(sigma)/4 for sigma in ~[0.002, 80]
    label = torch.arange(B) % NUM_CLASSES
    return x, c_noise, label


def make(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name].make(**kw)


@names
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_shape_with_and_without_labels(name: str, num_classes: int) -> None:
    net = perturb(make(name, num_classes=num_classes)).eval()
    x, c_noise, label = inputs(name)
    for lab in (label, None):
        out = net(x, c_noise, lab)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_out_channels(name: str) -> None:
    net = perturb(make(name, out_channels=3)).eval()
    x, c_noise, _ = inputs(name)
    assert net(x, c_noise).shape == (B, 3, *x.shape[2:])


@names
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_fresh_net_returns_exact_zeros(name: str, num_classes: int) -> None:
    net = make(name, num_classes=num_classes)
    x, c_noise, label = inputs(name)
    assert torch.equal(net(x, c_noise, label if num_classes else None), torch.zeros_like(x))
    # ... because of the zero output layer alone: the features feeding it are not zero.
    assert net.features(x, c_noise).abs().sum() > 0


@names
def test_null_class_equals_no_label(name: str) -> None:
    net = perturb(make(name, num_classes=NUM_CLASSES)).eval()
    x, c_noise, _ = inputs(name)
    null = torch.full((B,), NUM_CLASSES)
    torch.testing.assert_close(net(x, c_noise, null), net(x, c_noise, None), rtol=0, atol=0)


@names
def test_labels_change_output_only_when_conditional(name: str) -> None:
    x, c_noise, _ = inputs(name)
    zeros, ones, null = (torch.full((B,), k) for k in (0, 1, NUM_CLASSES))
    net = perturb(make(name, num_classes=NUM_CLASSES)).eval()
    outs = [net(x, c_noise, lab) for lab in (zeros, ones, null)]
    for i in range(3):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().amax() > 1e-4
    uncond = perturb(make(name)).eval()
    assert torch.equal(uncond(x, c_noise, zeros), uncond(x, c_noise, None))
    assert torch.equal(uncond(x, c_noise, ones), uncond(x, c_noise, None))


@names
def test_c_noise_changes_output(name: str) -> None:
    net = perturb(make(name)).eval()
    x, c_noise, _ = inputs(name)
    out = net(x, c_noise)
    assert (net(x, c_noise + 0.5) - out).abs().amax() > 1e-4
    # Each sample sees its own noise level: changing sample 0's leaves the others alone.
    moved = c_noise.clone()
    moved[0] += 0.5
    out2 = net(x, moved)
    assert (out2[0] - out[0]).abs().amax() > 1e-4
    torch.testing.assert_close(out2[1:], out[1:])


@names
def test_scalar_c_noise_broadcasts(name: str) -> None:
    net = perturb(make(name)).eval()
    x, _, _ = inputs(name)
    torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((B,), 0.3)))
    with pytest.raises(ValueError, match="c_noise"):
        net(x, torch.zeros(B + 1))


@names
def test_gradients_reach_every_parameter(name: str) -> None:
    net = perturb(make(name, num_classes=NUM_CLASSES, dropout=0.1)).train()
    x, c_noise, label = inputs(name)
    label = torch.arange(B) % (NUM_CLASSES + 1)  # the NULL row is trained too
    net(x, c_noise, label).square().sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@names
def test_fresh_net_trains_its_output_layer_first(name: str) -> None:
    """At initialisation the only gradient that is non-zero is the output layer's (the zero-init design)."""
    net = make(name).eval()
    x, c_noise, _ = inputs(name)
    (net(x, c_noise) - x).square().sum().backward()
    for layer in CASES[name].output_layers:
        assert net.get_submodule(layer).weight.grad.abs().sum() > 0


@names
def test_features_shape_feature_dim_and_source(name: str) -> None:
    case = CASES[name]
    net = perturb(make(name, num_classes=NUM_CLASSES)).eval()
    x, c_noise, label = inputs(name)
    feats = net.features(x, c_noise, label)
    assert feats.shape == (B, *case.feature_shape)
    channel_axis = -1 if name == "dit" else 1
    assert feats.shape[channel_axis] == net.feature_dim
    # features() is what forward() computes at the documented place (bottleneck / last block / last hidden).
    kind, where = case.feature_site
    seen = {}
    module = net.get_submodule(where)
    if kind == "output":
        handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("f", out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("f", args[0]))
    net(x, c_noise, label)
    handle.remove()
    torch.testing.assert_close(feats, seen["f"])
    assert (net.features(x, c_noise, None) - feats).abs().amax() > 1e-5


@names
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_spec_round_trip(name: str, num_classes: int) -> None:
    extra = {"embedding_type": "fourier"} if name != "mlp" else {}
    net = perturb(make(name, num_classes=num_classes, **extra)).eval()
    description = spec.describe(net)
    description = json.loads(json.dumps(description))  # plain data, as a checkpoint stores it
    torch.manual_seed(123)  # a different seed: random buffers (Fourier frequencies) must come from the state dict
    rebuilt = spec.build(description).eval()
    assert type(rebuilt) is type(net) and rebuilt.init_args == net.init_args
    rebuilt.load_state_dict(net.state_dict())
    x, c_noise, label = inputs(name)
    lab = label if num_classes else None
    torch.testing.assert_close(rebuilt(x, c_noise, lab), net(x, c_noise, lab), rtol=0, atol=0)


@names
def test_dropout_active_in_train_mode_only(name: str) -> None:
    net = perturb(make(name, dropout=0.3))
    x, c_noise, _ = inputs(name)
    net.train()
    assert (net(x, c_noise) - net(x, c_noise)).abs().amax() > 1e-5
    net.eval()
    torch.testing.assert_close(net(x, c_noise), net(x, c_noise), rtol=0, atol=0)
    no_dropout = perturb(make(name, dropout=0.0)).train()
    torch.testing.assert_close(no_dropout(x, c_noise), no_dropout(x, c_noise), rtol=0, atol=0)


@names
def test_bad_arguments_fail_with_a_sentence(name: str) -> None:
    with pytest.raises(ValueError, match="dropout"):
        make(name, dropout=1.5)
    with pytest.raises(ValueError, match="embedding_type"):
        make(name, embedding_type="learned")


@names
def test_bf16_autocast_and_bf16_weights(name: str) -> None:
    net = perturb(make(name, num_classes=NUM_CLASSES, embedding_type="fourier"), scale=0.1).eval()
    x, c_noise, label = inputs(name)
    ref = net(x, c_noise, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net(x, c_noise, label)
    assert mixed.shape == x.shape
    torch.testing.assert_close(mixed.float(), ref, rtol=0.1, atol=0.05 * ref.abs().amax().item())
    freqs = net.map_noise.freqs.clone()
    net.to(torch.bfloat16)  # a frozen teacher kept in the compute dtype
    assert torch.equal(net.map_noise.freqs, freqs)  # the Fourier frequencies keep full precision
    low = net(x.bfloat16(), c_noise, label)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.05 * ref.abs().amax().item())


@names
def test_compiles_without_graph_breaks(name: str) -> None:
    net = perturb(make(name, num_classes=NUM_CLASSES)).eval()
    x, c_noise, label = inputs(name)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, c_noise, label), net(x, c_noise, label))
    torch.testing.assert_close(compiled(x, c_noise, None), net(x, c_noise, None))
