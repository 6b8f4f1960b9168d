"""Karras σ grid (EDM eq. 5): endpoints exact, formula in between, monotone."""

from __future__ import annotations

import pytest
import torch

from lit_gen.diffusion import karras_sigmas
from lit_gen.errors import LitGenError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3, 18, 40, 256])
def test_endpoints_exact(n, dtype):
    s = karras_sigmas(n, 0.002, 80.0, 7.0, dtype=dtype)
    assert s.shape == (n + 1,) and s.dtype == dtype
    assert s[0].item() == torch.tensor(80.0, dtype=dtype).item()
    assert s[n - 1].item() == torch.tensor(0.002, dtype=dtype).item()
    assert s[n].item() == 0.0
    assert (s[1:] < s[:-1]).all()


def test_interior_matches_eq5():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    s = karras_sigmas(n, lo, hi, rho, dtype=torch.float64)
    for i in (1, 5, 9, 16):
        expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert s[i].item() == pytest.approx(expected, rel=1e-12)
    # rho = 1 is a linear grid
    lin = karras_sigmas(4, 1.0, 4.0, 1.0, dtype=torch.float64)
    torch.testing.assert_close(lin, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))


def test_one_step_and_bad_arguments():
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(LitGenError):
        karras_sigmas(0)
    with pytest.raises(LitGenError):
        karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)
