"""SampleGrid draws from the weights a user would export: the method's own EMA network when it has one (TRACT's
inference EMA, f-distill's generator EMA), else the EMA callback's average, else the raw network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.sample_grid import SampleGrid
from lit_gen.methods.tract import TRACT
from tests.conftest import REPO, run_cli


def test_the_methods_own_ema_network_is_sampled(toy_teacher_run: Path) -> None:
    method = TRACT(teacher=str(toy_teacher_run / "checkpoints" / "last.ckpt"), schedule=(8, 2, 1), steps_per_phase=4)
    with torch.no_grad():
        next(method.net.parameters()).add_(1.0)  # the raw student moves away from its EMA
    with SampleGrid()._averaged(SimpleNamespace(callbacks=[]), method) as net:
        assert net is method.net_ema and net is not method.net


@pytest.mark.slow
def test_grids_are_written_during_a_distillation(toy_shards: Path, toy_teacher_run: Path, tmp_path: Path) -> None:
    run_cli(
        "fit", "-c", REPO / "recipes/toy2d/tract.yaml", "--data.init_args.shards", toy_shards,
        "--model.init_args.teacher", toy_teacher_run / "checkpoints" / "last.ckpt",
        "--model.init_args.schedule", "[8, 2, 1]", "--model.init_args.steps_per_phase", "3",
        "--data.init_args.batch_size", "64", "--trainer.max_steps", "6", "--trainer.default_root_dir", tmp_path,
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=callbacks.sample_grid.SampleGrid", "--trainer.callbacks.every_n_steps=3",
        "--trainer.callbacks.n=256",
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_0000003.png", "step_0000006.png"]
