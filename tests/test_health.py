"""Training health: logged signals past their thresholds warn once, in a sentence; a real f-distill run whose
discriminator does not learn (its learning rate ~0) is told so, a healthy one is not."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.health import HEALTH_FILE, TrainingHealth
from tests.conftest import REPO, run_cli


def feed(health: TrainingHealth, trainer: SimpleNamespace, steps: int, **values: float) -> None:
    for _ in range(steps):
        trainer.global_step += 1
        trainer.callback_metrics = {k.replace("__", "/"): torch.tensor(v) for k, v in values.items()}
        health.on_train_batch_end(trainer, None)


def fake_trainer(root: Path) -> SimpleNamespace:
    return SimpleNamespace(global_step=0, global_rank=0, default_root_dir=str(root), loggers=[], callback_metrics={})


def test_each_problem_is_warned_once_past_its_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    health = TrainingHealth(window=10, warmup_steps=20)
    trainer = fake_trainer(tmp_path)
    feed(health, trainer, 15, train__disc_accuracy=0.5, train__loss_fake=0.2)  # before warmup_steps: quiet
    assert not health.warned and not (tmp_path / HEALTH_FILE).exists()
    feed(health, trainer, 30, train__disc_accuracy=0.5, train__loss_fake=0.2)
    assert list(health.warned) == ["discriminator_at_chance"]
    feed(health, trainer, 30, train__disc_accuracy=0.5, train__loss_fake=1.0, train__weight_max=40.0)
    assert set(health.warned) == {"discriminator_at_chance", "fake_score_lagging", "weights_concentrated"}
    err = capsys.readouterr().err
    assert err.count("discriminator is at chance") == 1 and err.count("fake score lags") == 1
    assert len((tmp_path / HEALTH_FILE).read_text().splitlines()) == 3

    resumed = TrainingHealth(window=10, warmup_steps=20)
    resumed.load_state_dict(health.state_dict())  # a resumed run does not repeat a warning
    feed(resumed, fake_trainer(tmp_path), 40, train__disc_accuracy=0.5)
    assert "discriminator is at chance" not in capsys.readouterr().err


def test_healthy_signals_and_a_coverage_drop(tmp_path: Path) -> None:
    health = TrainingHealth(window=10, warmup_steps=0)
    trainer = fake_trainer(tmp_path)
    feed(health, trainer, 30, train__disc_accuracy=0.6, train__disc_acc_real=0.7, train__disc_acc_fake=0.5)
    feed(health, trainer, 30, train__loss_fake=0.3, train__weight_max=3.0, eval__recall_1step=0.8)
    assert not health.warned
    feed(health, trainer, 2, eval__recall_1step=0.5)  # below 0.7 x its best (0.8)
    assert list(health.warned) == ["collapse:eval/recall_1step"]
    # Real and fake accuracies, when logged, decide: 0.5 * (0.52 + 0.5) is at chance although disc_accuracy is not.
    health = TrainingHealth(window=10, warmup_steps=0)
    values = {"train__disc_accuracy": 0.6, "train__disc_acc_real": 0.52, "train__disc_acc_fake": 0.5}
    feed(health, fake_trainer(tmp_path), 12, **values)
    assert "(real 0.52, generated 0.50)" in health.warned["discriminator_at_chance"]


def _fdistill(teacher: Path, shards: Path, root: Path, disc_lr_scale: float) -> None:
    run_cli(
        "fit", "-c", REPO / "recipes/toy2d/fdistill.yaml", "--data.init_args.shards", shards,
        "--model.init_args.teacher", teacher / "checkpoints" / "last.ckpt", "--trainer.default_root_dir", root,
        "--trainer.max_steps", 100, "--model.init_args.decay_steps", 100, "--data.init_args.batch_size", 256,
        "--model.init_args.disc_lr_scale", disc_lr_scale, "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=callbacks.health.TrainingHealth",
        "--trainer.callbacks.init_args.warmup_steps", 50, "--trainer.callbacks.init_args.window", 40,
    )  # fmt: skip


@pytest.mark.slow
def test_a_discriminator_that_does_not_learn_is_reported(
    toy_teacher_run: Path, toy_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # disc_lr_scale must be positive: 1e-12 x lr freezes the head at its initialisation (an lr of ~1e-15).
    _fdistill(toy_teacher_run, toy_shards, tmp_path / "frozen", 1e-12)
    err = capsys.readouterr().err
    assert err.count("the discriminator is at chance") == 1, err[-3000:]
    assert "discriminator is at chance" in (tmp_path / "frozen" / HEALTH_FILE).read_text()

    _fdistill(toy_teacher_run, toy_shards, tmp_path / "healthy", 1.0)
    assert "lit-gen: warning" not in capsys.readouterr().err
    assert not (tmp_path / "healthy" / HEALTH_FILE).exists()
