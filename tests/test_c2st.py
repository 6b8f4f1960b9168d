"""The classifier two-sample test (``--metric c2st``) and the real-data floor row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gen.eval.metrics import ClassifierTwoSampleTest


def test_c2st_is_chance_for_one_distribution_and_high_for_two() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 2, generator=g)
    c2st = ClassifierTwoSampleTest(epochs=20)
    c2st.set_reference(real)
    same = c2st(torch.randn(600, 2, generator=g))
    shifted = c2st(torch.randn(600, 2, generator=g) * 0.6 + torch.tensor([0.8, 0.0]))
    assert abs(same - 0.5) < 0.06, same
    assert shifted > 0.7, shifted  # the Bayes classifier of these two Gaussians is right ~78 % of the time
    assert c2st(torch.randn(600, 2, generator=torch.Generator().manual_seed(5))) == c2st(
        torch.randn(600, 2, generator=torch.Generator().manual_seed(5))
    )  # seeded: the same sets give the same number


def test_c2st_on_pixels_sees_what_a_mean_statistic_would_miss() -> None:
    """Images with the same pixel histogram but a stroke in another place: told apart by the position-aware CNN."""
    g = torch.Generator().manual_seed(0)
    real = torch.zeros(400, 1, 8, 8)
    fake = torch.zeros(400, 1, 8, 8)
    rows = torch.randint(0, 8, (400,), generator=g)
    real[torch.arange(400), 0, rows, 2] = 255.0  # a bright pixel in column 2
    fake[torch.arange(400), 0, rows, 5] = 255.0  # ... or in column 5: same mean, same histogram
    c2st = ClassifierTwoSampleTest(epochs=10)
    c2st.set_reference(real.to(torch.uint8))
    assert c2st(fake) > 0.95
    assert abs(c2st(real[torch.randperm(400, generator=g)].float()) - 0.5) < 0.1


@pytest.mark.slow
def test_eval_reports_c2st_and_the_floor_row(tmp_path: Path) -> None:
    """``Evaluator.score_real``: the digits training split against the held-out split is near chance."""
    from lit_gen.cli import main
    from lit_gen.eval import Evaluator

    main(["shards", "builtin:digits", "--out", str(tmp_path / "d"), "--val-fraction", "0.15", "--seed", "0"])
    evaluator = Evaluator(tmp_path / "d" / "val", ["fd", "c2st"])
    row = evaluator.score_real(tmp_path / "d" / "train", 1000)
    assert row["model"] == "real train split" and row["method"] == "data" and row["n"] == 1000
    assert 0.35 < row["c2st"] < 0.65 and np.isfinite(row["fd"])
