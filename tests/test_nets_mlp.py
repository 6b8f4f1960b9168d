"""MLPDenoiser: learns a sharp mixture denoiser quickly (the toy 2-D teacher depends on it)."""

from __future__ import annotations

import torch

from lit_gen.nets import MLPDenoiser

MODES = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
STD = 0.02


def bayes_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ an equal mixture of N(mode, STD^2 I) and x = x0 + sigma * n."""
    var = STD**2 + sigma**2  # [B, 1]
    w = (-(x[:, None] - MODES[None]).square().sum(-1) / (2 * var)).softmax(dim=1)  # [B, K]
    means = (STD**2 * x[:, None] + sigma[:, :, None] ** 2 * MODES[None]) / var[:, :, None]  # [B, K, 2]
    return (w[:, :, None] * means).sum(1)


def test_learns_a_sharp_two_mode_denoiser_quickly() -> None:
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=64, depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = MODES[torch.randint(2, (n,))] + STD * torch.randn(n, 2)
        sigma = torch.exp(torch.empty(n, 1).uniform_(-3.0, 0.0))  # sigma in [0.05, 1]
        return x0, x0 + sigma * torch.randn_like(x0), sigma

    for _ in range(200):
        x0, x, sigma = draw(256)
        opt.zero_grad()
        (net(x, sigma.log().flatten() / 4) - x0).square().sum(1).mean().backward()
        opt.step()
    with torch.no_grad():
        _, x, sigma = draw(4096)
        error = (net(x, sigma.log().flatten() / 4) - bayes_denoiser(x, sigma)).square().sum(1).mean().item()
    assert error < 0.0035, error  # zero net: ~1; identity: ~0.26; blind to c_noise: ~0.005
