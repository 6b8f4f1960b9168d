"""``--metric elbo`` / ``--metric nll``: units (nats/dim in data units, bits/dim for 8-bit images), the exact
Gaussian model's values, scaling the data shifts nats/dim by log c, students are refused in one line."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lit_gen.data.builtin import TOY2D
from lit_gen.diffusion import EDM, VP
from lit_gen.errors import LitGenError
from lit_gen.eval.command import add_parser
from lit_gen.eval.likelihood import LikelihoodOptions, likelihood_scores
from lit_gen.eval.reference import read_reference
from lit_gen.eval.runner import Evaluator
from lit_gen.export import LoadedModel


class ZeroNet(nn.Module):
    """F ≡ 0: with EDM preconditioning D(x; σ) = c_skip(σ) x, the exact denoiser of N(0, σ_d² I) (ALGORITHMS.md
    §1.1), so the model's density in model space is N(0, σ_d² I) up to the σ_min / σ_max ends."""

    init_args: dict = {}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(x)


def zero_model(
    info: dict, method: str = "teacher", grid: list[float] | None = None, param: EDM | VP | None = None
) -> LoadedModel:
    sampling = {"sampler": "heun", "steps": 18, **({"grid": grid} if grid else {})}
    description = {"method": method, "data": info, "sampling": sampling}
    return LoadedModel(net=ZeroNet(), param=param or EDM(sigma_data=0.5), description=description)


def points_info(shift: list[float], scale: float) -> dict:
    return {"kind": "points", "shape": [len(shift)], "num_classes": 0, "normalize": {"shift": shift, "scale": scale}}


def test_points_are_nats_per_dim_in_data_units_and_scaling_shifts_by_log_c() -> None:
    z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for c in (1.0, 10.0):
        shift, scale = [3.0 * c, -1.0 * c], 4.0 * c
        raw = (torch.tensor(shift, dtype=torch.float64) + 0.5 * scale * z).float()  # model space: N(0, 0.25 I)
        # A decoder of width 0.05 (model space): the exact model's ELBO gap ½ ln(1 + 0.05²/0.25) = 0.005 nats/dim
        # and the ELBO's Monte Carlo error (~0.006) are then of one size; 20 % of it is a safe margin.
        options = LikelihoodOptions(sigma_min=0.05, n_lambda=64)
        results[c] = likelihood_scores(
            zero_model(points_info(shift, scale)), raw, None, ["elbo", "nll"], options=options
        )
        entropy = 0.5 * math.log(2 * math.pi * math.e * (0.5 * scale) ** 2)  # per dim, data units
        assert abs(results[c]["nll"] - entropy) < 0.05  # sampling noise of 3000 points
        assert results[c]["elbo"] >= results[c]["nll"] - 0.01
    for key in ("elbo", "nll"):
        assert results[10.0][key] - results[1.0][key] == pytest.approx(math.log(10.0), abs=1e-4)


def test_a_vp_teacher_has_a_likelihood_too() -> None:
    # VP v-prediction with v̂ ≡ 0: x̂ = α z = x / (1 + σ²), the exact denoiser of N(0, I) in model space.
    z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    info = points_info([1.0, 2.0], 3.0)
    raw = (torch.tensor([1.0, 2.0], dtype=torch.float64) + 3.0 * z).float()
    model = zero_model(info, param=VP(prediction="v"))
    scores = likelihood_scores(model, raw, None, ["elbo", "nll"], options=LikelihoodOptions(sigma_min=0.05))
    entropy = 0.5 * math.log(2 * math.pi * math.e * 9.0)
    assert abs(scores["nll"] - entropy) < 0.05 and scores["elbo"] >= scores["nll"] - 0.01


def test_images_are_bits_per_dim_on_the_8_bit_scale_with_uniform_dequantisation() -> None:
    info = {"kind": "image", "shape": [1, 8, 8], "num_classes": 0, "normalize": {"shift": 127.5, "scale": 127.5}}
    x = 0.5 * torch.randn(400, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    raw = (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    scores = likelihood_scores(zero_model(info), raw, None, ["nll"], options=LikelihoodOptions(steps=16, seed=3))
    # The model is N(0, 0.25) per pixel in model space; E_u of the dequantised x² adds 1/(12·127.5²).
    centred = ((raw.double() - 127.5) / 127.5) ** 2 + 1 / (12 * 127.5**2)
    nats = 0.5 * math.log(2 * math.pi * 0.25) + centred / (2 * 0.25) + math.log(127.5)
    expected_bits = nats.mean().item() / math.log(2)
    assert scores["nll"] == pytest.approx(expected_bits, abs=0.01)
    assert 6.0 < scores["nll"] < 8.0  # a broad Gaussian over 256 levels: close to the 8 bits of a uniform


def test_students_and_unlabelled_conditional_models_are_refused_in_one_line() -> None:
    info = points_info([0.0, 0.0], 1.0)
    raw = torch.zeros(8, 2)
    with pytest.raises(LitGenError, match="'tract' student, which has no score function") as err:
        likelihood_scores(zero_model(info, "tract", grid=[80.0, 0.0]), raw, None, ["nll"])
    assert "\n" not in str(err.value)
    with pytest.raises(LitGenError, match="'fdistill' student"):
        likelihood_scores(zero_model(info, "fdistill", grid=[80.0, 0.0]), raw, None, ["elbo"])
    with pytest.raises(LitGenError, match="--likelihood-steps must be at least 1"):
        LikelihoodOptions(steps=0)


def test_evaluator_rows_carry_elbo_and_nll_without_sampling(toy_shards: Path) -> None:
    evaluator = Evaluator(toy_shards, metrics=["elbo", "nll"], likelihood=LikelihoodOptions(steps=8, n_lambda=4))
    model = zero_model(evaluator.info)
    rows = evaluator.evaluate(model, n=500, steps=[1, 18])
    assert [set(r) for r in rows] == [{"model", "method", "sampler", "steps", "nfe", "n", "elbo", "nll"}] * 2
    assert rows[0]["nll"] == rows[1]["nll"] and math.isfinite(rows[0]["elbo"])  # once per model
    with pytest.raises(LitGenError, match="student"):
        evaluator.evaluate(zero_model(evaluator.info, "consistency", grid=[80.0, 0.0]), n=100)


@pytest.mark.slow
def test_lit_gen_eval_reports_a_toy_teachers_likelihood(toy_teacher_run: Path, toy_shards: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="lit-gen")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    ns = parser.parse_args(["eval", "--ckpt", str(ckpt), "--ref", str(toy_shards), "--metric", "elbo", "nll", "--n",
                            "1000", "--json"])  # fmt: skip
    ns.func(ns)
    (row,) = json.loads(capsys.readouterr().out)
    raw, _, _ = read_reference(toy_shards, 1000)
    cross_entropy = float(-TOY2D["gmm8"].log_prob(np.asarray(raw)).mean() / 2)
    assert math.isfinite(row["elbo"]) and math.isfinite(row["nll"])
    assert row["elbo"] >= cross_entropy - 0.05 and row["nll"] > cross_entropy - 0.2  # a 600-step teacher
