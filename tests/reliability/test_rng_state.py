"""RNG streams continue exactly across a resume (callbacks.rng_state.RNGState)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer

from callbacks.checkpoint import Checkpoint
from callbacks.rng_state import RNGState


class NoiseOnly(LightningModule):
    """Its updates depend only on the global RNGs (torch, numpy, random), not on the data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = torch.randn(8, 4) * (1 + np.random.rand()) + random.random()
        return (self.layer(x) - 1).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.zeros(100, 1), batch_size=1)


def run(root: Path, steps: int, callbacks: list, ckpt_path: str | None = None) -> NoiseOnly:
    model = NoiseOnly()
    checkpoint = Checkpoint(dirpath=root, save_last=True, every_n_train_steps=3, save_top_k=0)
    trainer = Trainer(max_steps=steps, callbacks=[checkpoint, *callbacks], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=root)  # fmt: skip
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_resumed_run_draws_the_same_noise(tmp_path: Path) -> None:
    full = run(tmp_path / "full", 6, [RNGState()])
    run(tmp_path / "split", 3, [RNGState()])
    assert torch.load(tmp_path / "split" / "last.ckpt", weights_only=True)["rng_states"]  # plain data only
    resumed = run(tmp_path / "split", 6, [RNGState()], ckpt_path=str(tmp_path / "split" / "last.ckpt"))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # Without the callback the resumed run diverges (the test can tell).
    run(tmp_path / "plain", 3, [])
    plain = run(tmp_path / "plain", 6, [], ckpt_path=str(tmp_path / "plain" / "last.ckpt"))
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), plain.parameters(), strict=True))
