"""EMA callback: EDM's half-life with ramp-up of the trained network only; the checkpoint holds EMA + raw."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.ema import EMA, ema_beta


def test_ema_beta_half_life_and_rampup() -> None:
    # After `halflife` updates the old weights have half the influence.
    assert ema_beta(10_000, 100.0, None) ** 100 == pytest.approx(0.5)
    # Ramp-up: early on the half-life is step * ratio (EDM), so the first updates nearly copy the weights.
    assert ema_beta(1, 100.0, 0.05) == pytest.approx(0.5 ** (1 / 0.05))
    assert ema_beta(1000, 100.0, 0.05) == pytest.approx(0.5 ** (1 / 50.0))
    assert ema_beta(10_000, 100.0, 0.05) == pytest.approx(0.5 ** (1 / 100.0))


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), batch_size=8)


class _Record(Callback):
    def __init__(self) -> None:
        self.raw: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # type: ignore[no-untyped-def]
        self.raw.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))


def test_ema_matches_hand_computed_average_and_checkpoint_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    record = _Record()
    ema = EMA(halflife_steps=3.0, rampup_ratio=0.5, target="layer")
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=6, save_top_k=0)
    trainer = Trainer(
        max_steps=6,
        callbacks=[record, ema, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(_Tiny())
    # Hand-computed: first update copies (bias-corrected), then e_k = beta_k e_{k-1} + (1 - beta_k) p_k.
    expected = record.raw[0].clone()
    for k, raw in enumerate(record.raw[1:], start=2):
        beta = ema_beta(k, 3.0, 0.5)
        expected = beta * expected + (1 - beta) * raw
    averaged = torch.cat([ema.shadow[k].flatten() for k in ("weight", "bias")])
    torch.testing.assert_close(averaged, expected)
    assert not torch.allclose(expected, record.raw[-1])  # the test would notice "EMA = raw weights"

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved_ema = torch.cat([checkpoint["ema_state_dict"][k].flatten() for k in ("layer.weight", "layer.bias")])
    saved_raw = torch.cat([checkpoint["state_dict"][k].flatten() for k in ("layer.weight", "layer.bias")])
    torch.testing.assert_close(saved_ema, expected)
    torch.testing.assert_close(saved_raw, record.raw[-1])
    assert math.isfinite(float(saved_ema.sum()))
