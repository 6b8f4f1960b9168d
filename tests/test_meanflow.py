"""MeanFlow (Geng et al. 2025; ALGORITHMS.md §11): the identity on exact Gaussian-data velocities (u(z, t, t) = v, zero
loss), exact few-step sampling, the (r, t) proposal, the adaptive weight, the nets' second time input (zero-init,
backward compatible) and the LightningModule with its checkpoint sampling."""

from __future__ import annotations

import pytest
import torch

from lit_gen.diffusion.meanflow import (
    MeanFlow,
    average_velocity_tangent,
    flow_noise,
    meanflow_loss,
    meanflow_target,
    sample_meanflow,
)
from lit_gen.errors import LitGenError
from lit_gen.export import LoadedModel
from lit_gen.methods.meanflow import MeanFlowTraining
from lit_gen.nets import DiT, MLPDenoiser, UNet
from lit_gen.spec import build, describe

S = 0.6  # data N(0, S² I)
F64 = torch.float64


def _m(t: torch.Tensor) -> torch.Tensor:
    """Var(z_t) / I for z_t = (1 − t) x + t ε with x ~ N(0, S² I)."""
    return (1 - t) ** 2 * S**2 + t**2


def exact_v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The marginal velocity E[ε − x | z_t] = (t − (1 − t) S²)/m(t) · z."""
    return ((t - (1 - t) * S**2) / _m(t)).view(-1, 1) * z


def exact_net(z: torch.Tensor, c: torch.Tensor, label: torch.Tensor | None = None, c_aux=None) -> torch.Tensor:
    """The exact average velocity as a 'network' (time_scale 1: c = t, c_aux = t − r): the PF-ODE is
    z_r = z_t √(m(r)/m(t)), so u = z (1 − √(m(r)/m(t)))/(t − r), and u = v at r = t."""
    t, delta = c.view(-1, 1), c_aux.view(-1, 1)
    r = t - delta
    safe = torch.where(delta.abs() > 1e-12, delta, torch.ones_like(delta))
    u = z * (1 - torch.sqrt(_m(r) / _m(t))) / safe
    return torch.where(delta.abs() > 1e-12, u, exact_v(z, t.view(-1)))


def _points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = S * torch.randn(n, 2, generator=gen, dtype=F64)
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    a, b = torch.rand(2, n, generator=gen, dtype=F64) * 0.9 + 0.05
    return x, eps, torch.stack([torch.minimum(a, b), torch.maximum(a, b)])


def test_u_at_r_equals_t_is_the_velocity() -> None:
    mf = MeanFlow()
    x, eps, (r, t) = _points(64, 0)
    z = flow_noise(x, eps, t)
    torch.testing.assert_close(mf.u(exact_net, z, t, t), exact_v(z, t))
    # ... and u is continuous there (the limit r → t).
    torch.testing.assert_close(mf.u(exact_net, z, t - 1e-6, t), exact_v(z, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["autograd", "finite"])
def test_exact_average_velocity_has_zero_meanflow_loss(mode: str) -> None:
    mf = MeanFlow()
    x, eps, (r, t) = _points(128, 1)
    z = flow_noise(x, eps, t)
    v = exact_v(z, t)  # the marginal velocity: the identity holds pointwise
    u, du_dt = average_velocity_tangent(mf.bind(exact_net), z, r, t, v, mode, eps=1e-5)
    target = meanflow_target(v, du_dt, r, t)
    tol = 1e-10 if mode == "autograd" else 1e-7
    assert (u - target).abs().max() <= tol
    assert meanflow_loss(u, target, power=0).max() <= tol**2 * 10
    # The conditional velocity ε − x gives a non-zero per-sample loss (the identity holds in expectation only).
    _, du_c = average_velocity_tangent(mf.bind(exact_net), z, r, t, eps - x, mode, eps=1e-5)
    assert meanflow_loss(u, meanflow_target(eps - x, du_c, r, t), power=0).mean() > 1e-3


@pytest.mark.parametrize("mode", ["autograd", "finite"])
def test_predicted_tangent_leaves_only_flow_matching_noise_in_the_target(mode: str) -> None:
    """Improved MeanFlow (iMF Sec. 4.1): with the JVP along ṽ = u(z, t, t) — the marginal velocity for the exact
    model — the target v_c − (t − r) du/dt differs from the exact u by exactly v_c − v(z_t), flow matching's own
    noise, where the conditional tangent adds (t − r) ∂_z u (v_c − v) on top."""
    mf = MeanFlow()
    x, eps, (r, t) = _points(128, 2)
    z = flow_noise(x, eps, t)
    fn = mf.bind(exact_net)
    v_c = eps - x
    u, du_dt = average_velocity_tangent(fn, z, r, t, fn(z, t, t), mode, eps=1e-5)
    tol = 1e-10 if mode == "autograd" else 1e-7
    assert (meanflow_target(v_c, du_dt, r, t) - u - (v_c - exact_v(z, t))).abs().max() <= tol
    _, du_c = average_velocity_tangent(fn, z, r, t, v_c, mode, eps=1e-5)
    assert (meanflow_target(v_c, du_c, r, t) - u - (v_c - exact_v(z, t))).abs().max() > 1e-2


def test_method_predicted_tangent_is_the_networks_own_velocity() -> None:
    """The method's ``tangent: predicted`` loss equals the loss built by hand with the JVP along u_θ(z, t, t); with
    r = t everywhere the two tangents give the same loss (the JVP term vanishes)."""
    x = torch.randn(64, 2) * 0.5
    methods = {}
    for ratio in (1.0, 0.0):
        losses = {}
        for tangent in ("conditional", "predicted"):
            method = _method(tangent=tangent, ratio_r_neq_t=ratio)
            with torch.no_grad():
                for p in method.net.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            torch.manual_seed(3)
            losses[tangent] = method.meanflow_loss(x, None).detach()
            methods[ratio, tangent] = method
        if ratio == 0.0:
            torch.testing.assert_close(losses["conditional"], losses["predicted"])
        else:
            assert (losses["conditional"] - losses["predicted"]).abs().max() > 1e-4
            predicted = losses["predicted"]
    method = methods[1.0, "predicted"]
    torch.manual_seed(3)  # the method's draws, in its order: (r, t), then ε
    r, t = method.param.sample_times(64, method.p_mean, method.p_std, 1.0)
    eps = torch.randn_like(x)
    z = flow_noise(x, eps, t)
    fn = method.param.bind(method.net)
    with torch.no_grad():
        _, du_dt = average_velocity_tangent(fn, z, r, t, fn(z, t, t))
        expected = meanflow_loss(fn(z, r, t), meanflow_target(eps - x, du_dt, r, t), method.adaptive_power)
    torch.testing.assert_close(predicted, expected)
    assert method.describe()["meanflow"]["tangent"] == "predicted"
    with pytest.raises(LitGenError, match="tangent"):
        _method(tangent="marginal")


def test_exact_model_samples_exactly_in_one_and_two_steps() -> None:
    mf = MeanFlow()
    z1 = torch.randn(1000, 2, dtype=F64)

    def denoiser(z, t, label, r=None):
        return mf.denoise(exact_net, z, t, label, r=r)

    for grid in ([1.0, 0.0], [1.0, 0.5, 0.0]):
        out = sample_meanflow(denoiser, z1, torch.tensor(grid, dtype=F64))
        torch.testing.assert_close(out, z1 * S)  # z_0 = z_1 √(m(0)/m(1)) = S z_1
    with pytest.raises(LitGenError):
        sample_meanflow(denoiser, z1, torch.tensor([0.0, 1.0]))


def test_time_proposal_and_adaptive_weight() -> None:
    mf = MeanFlow()
    r, t = mf.sample_times(100_000, -0.4, 1.0, 0.25, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert bool((t >= r).all()) and float(t.max()) < 1 and float(r.min()) > 0
    assert abs(float((r != t).double().mean()) - 0.25) < 0.01
    # logit(t) of the larger of two N(−0.4, 1) draws has mean −0.4 + 1/√π.
    assert abs(float(torch.logit(t).mean()) - (-0.4 + 1 / torch.pi**0.5)) < 0.02
    u = torch.tensor([[3.0, 4.0]], requires_grad=True)
    loss = meanflow_loss(u, torch.zeros(1, 2), power=1.0, const=1e-3)
    torch.testing.assert_close(loss, torch.tensor([25.0 / 25.001]))
    loss.backward()  # sg(w) · ‖Δ‖²: gradient 2Δ/(‖Δ‖² + c)
    torch.testing.assert_close(u.grad, 2 * torch.tensor([[3.0, 4.0]]) / 25.001)


NETS = {
    "mlp": (lambda **kw: MLPDenoiser(dim=2, hidden=16, depth=2, emb_dim=8, **kw), (5, 2)),
    "unet": (
        lambda **kw: UNet(8, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), **kw),
        (2, 1, 8, 8),
    ),
    "dit": (lambda **kw: DiT(8, 1, patch_size=4, hidden_size=16, depth=1, num_heads=2, **kw), (2, 1, 8, 8)),
}


@pytest.mark.parametrize("kind", list(NETS))
def test_second_time_input_is_zero_init_and_backward_compatible(kind: str) -> None:
    make, shape = NETS[kind]
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    with_aux = make(aux_time=True)
    # Off by default: the spec is what files written before the option hold; on, it is recorded.
    assert "aux_time" not in describe(plain)["init_args"] and describe(with_aux)["init_args"]["aux_time"] is True
    assert "aux_time" not in build(describe(plain)).init_args
    # Same initial weights for the shared part; the plain net's state loads with only the new keys missing.
    shared = plain.state_dict()
    assert all(torch.equal(v, with_aux.state_dict()[k]) for k, v in shared.items())
    missing, unexpected = with_aux.load_state_dict(shared, strict=False)
    assert not unexpected and missing and all(k.startswith("map_aux.") for k in missing)
    with torch.no_grad():
        for p in plain.parameters():  # a "trained" teacher: non-zero outputs
            p.add_(0.05 * torch.randn_like(p))
        with_aux.load_state_dict(plain.state_dict(), strict=False)
        plain.eval(), with_aux.eval()  # (the UNet's default dropout)
        x, c = torch.randn(shape), torch.rand(shape[0])
        reference = plain(x, c)
        assert reference.abs().max() > 0
        for c_aux in (None, torch.rand(shape[0])):
            torch.testing.assert_close(with_aux(x, c, None, c_aux), reference)


def _method(**kw) -> MeanFlowTraining:
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, aux_time=True)
    method = MeanFlowTraining(net=net, **kw)
    method.data_info = {"shape": [2], "num_classes": 0, "kind": "points", "normalization": None}
    return method


@pytest.mark.parametrize("jvp", ["autograd", "finite"])
def test_method_loss_gradients_and_sampling(jvp: str) -> None:
    method = _method(jvp=jvp)
    method.train()
    torch.manual_seed(1)
    loss = method.meanflow_loss(torch.randn(128, 2) * 0.5, None).mean()
    assert torch.isfinite(loss) and 0 < float(loss) <= 1.0  # adaptive weight: each term ‖Δ‖²/(‖Δ‖² + c) < 1
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in method.net.parameters())
    section = method.describe()
    assert section["sampling"]["sampler"] == "meanflow" and section["sampling"]["grid"][0] == 1.0
    model = LoadedModel(net=method.net, param=method.param, description=section)
    one = model.sample(64, steps=1, seed=0, raw=True)
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 2, generator=gen)
    with torch.no_grad():
        expected = z1 - method.param.u(method.net, z1, torch.zeros(64), torch.ones(64))
    torch.testing.assert_close(one, expected)  # 1 NFE: x = z₁ − u(z₁, 0, 1)
    assert model.sample(64, steps=2, seed=0, raw=True).shape == (64, 2)
    with pytest.raises(LitGenError, match="meanflow sampler"):
        model.sample(8, sampler="heun")
    with pytest.raises(LitGenError, match="guidance"):
        model.sample(8, guidance=2.0)


def test_method_set_up_errors() -> None:
    with pytest.raises(LitGenError, match="aux_time"):
        MeanFlowTraining(net=MLPDenoiser(dim=2))
    with pytest.raises(LitGenError, match="class-conditional"):
        _method(cfg_scale=2.0)
    with pytest.raises(LitGenError, match="jvp"):
        _method(jvp="reverse")


def test_cfg_folded_into_training_uses_the_unconditional_velocity() -> None:
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=3, aux_time=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method = MeanFlowTraining(net=net, cfg_scale=2.0, label_dropout=0.5)
    z, t, v = torch.randn(256, 2), torch.rand(256), torch.randn(256, 2)
    label = torch.randint(0, 3, (256,))
    torch.manual_seed(4)
    guided, train_label = method.guided_velocity(z, t, v, label)
    dropped = train_label == 3
    assert 0 < int(dropped.sum()) < 256
    with torch.no_grad():
        u_null = method.param.u(net, z, t, t, torch.full_like(label, 3))
    torch.testing.assert_close(guided[dropped], v[dropped])
    torch.testing.assert_close(guided[~dropped], (2.0 * v - u_null)[~dropped])


def _fit_constant(targets: torch.Tensor, power: float, steps: int = 400) -> torch.Tensor:
    """The constant u minimising mean(meanflow_loss(u, target)) over a cloud of targets, by Adam from their mean
    (plus a nudge: the mean is a stationary but unstable point of the 2-D adaptive loss)."""
    u = (targets.mean(0, keepdim=True) + 0.05).clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        meanflow_loss(u.expand_as(targets), targets, power=power, const=1e-3).mean().backward()
        opt.step()
    return u.detach()[0]


def test_adaptive_weight_is_mode_seeking_in_two_dimensions() -> None:
    """A property of the adaptive weight that matters on 2-D data (issue 19 diagnosis): MeanFlow's target is the
    *conditional* velocity ε − x, a random variable given z_t whose mean is the right answer. With w = 1/(‖Δ‖² + c)
    (stop-gradient) the stationary point solves E[Δ/(‖Δ‖² + c)] = 0, which in 2-D pulls u onto one mode of a
    multimodal target (a candidate cause of the toy's 1-step mode loss); in higher dimensions ‖Δ‖² concentrates,
    w is nearly constant and the fit is the mean again (the paper's p = 1 on images). p = 0 gives the mean anywhere.
    (Measured: p = 0 on the toy did not help either, 1-step off-mode 94 % at step 1000 — see RESULTS.md.)"""
    gen = torch.Generator().manual_seed(0)
    side = torch.where(torch.rand(400, generator=gen) < 0.6, -1.0, 1.0)
    for dim in (2, 64):
        centre = torch.zeros(dim)
        centre[0] = 1.0
        noise = 0.05 if dim == 2 else 1.0  # 2-D: narrow modes (the toy's); 64-D: image-like per-pixel noise
        targets = side[:, None] * centre + noise * torch.randn(400, dim, generator=gen)
        mean = targets.mean(0)
        plain = _fit_constant(targets, power=0.0)
        assert float((plain - mean).norm()) < 0.03, dim
        adaptive = _fit_constant(targets, power=1.0)
        if dim == 2:
            assert min(float((adaptive - c).norm()) for c in (centre, -centre)) < 0.1  # sits on a mode
            assert float((adaptive - mean).norm()) > 0.6  # the mean is 0.8 from either mode
        else:
            assert float((adaptive - mean).norm()) < 0.1
