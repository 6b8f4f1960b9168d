"""A NaN loss or gradient stops the run after saving the last good state (naming step, loss term and network), or
with policy 'skip' drops that batch's update and counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from callbacks.checkpoint import Checkpoint
from callbacks.nonfinite import NonFiniteGuard
from lit_gen.data.datamodule import ShardDataModule
from lit_gen.errors import LitGenError
from lit_gen.export import read_checkpoint
from lit_gen.methods.teacher import TeacherDiffusion
from lit_gen.nets import MLPDenoiser


class Poisoned(TeacherDiffusion):
    """A teacher whose loss (or gradient) turns NaN at the given steps."""

    def __init__(self, bad_steps: tuple[int, ...], where: str = "loss") -> None:
        super().__init__(net=MLPDenoiser(dim=2, hidden=32, depth=2))
        self.bad_steps, self.where, self.before_bad = bad_steps, where, None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step in self.bad_steps:
            self.before_bad = {k: v.clone() for k, v in self.net.state_dict().items()}
            if self.where == "loss":
                batch = {**batch, "x": batch["x"] * float("nan")}  # a corrupt batch: the logged loss is NaN too
        return super().training_step(batch, batch_idx)


def fit(model: Poisoned, shards: Path, root: Path, steps: int, guard: NonFiniteGuard) -> Trainer:
    trainer = Trainer(
        default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Checkpoint(dirpath=root / "checkpoints", save_last=True), guard],
    )  # fmt: skip
    trainer.fit(model, ShardDataModule(str(shards), batch_size=64, steps_per_epoch=100))
    return trainer


def test_nan_loss_stops_after_saving_last_good_state(toy_shards: Path, tmp_path: Path) -> None:
    model = Poisoned(bad_steps=(3,))
    with pytest.raises(LitGenError, match=r"non-finite loss \(.*loss.*\) at step 3.*--ckpt_path last"):
        fit(model, toy_shards, tmp_path, 10, NonFiniteGuard())
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3
    for key, value in model.before_bad.items():
        assert torch.equal(saved["state_dict"][f"net.{key}"], value), key


def test_nan_gradient_names_the_network(toy_shards: Path, tmp_path: Path) -> None:
    class GradPoisoned(Poisoned):
        def on_after_backward(self) -> None:
            if self.global_step in self.bad_steps:
                self.net.proj_out.weight.grad.fill_(float("nan"))

    with pytest.raises(LitGenError, match="non-finite gradient in net at step 2"):
        fit(GradPoisoned(bad_steps=(2,), where="none"), toy_shards, tmp_path, 10, NonFiniteGuard())


def test_skip_policy_drops_the_update_and_counts(toy_shards: Path, tmp_path: Path) -> None:
    class Spy(Poisoned):
        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if self.global_step - 1 in self.bad_steps:  # just after the skipped step
                self.after = {k: v.clone() for k, v in self.net.state_dict().items()}

    model = Spy(bad_steps=(2,))
    guard = NonFiniteGuard(policy="skip")
    trainer = fit(model, toy_shards, tmp_path, 6, guard)
    assert trainer.global_step == 6 and guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(model.after[k], v) for k, v in model.before_bad.items())  # the bad batch changed nothing
    with pytest.raises(LitGenError, match="after 1 skipped"):
        fit(Poisoned(bad_steps=(1, 3)), toy_shards, tmp_path / "again", 6, NonFiniteGuard(policy="skip", max_skips=1))
