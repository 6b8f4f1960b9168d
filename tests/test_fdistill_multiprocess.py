"""f-distill's one-optimizer update scheme under 2-process DDP and DeepSpeed ZeRO-2 on CPU (gloo).

Each run trains 7 optimizer steps with update_ratio 3 in a subprocess (Lightning starts the second rank by
re-running the driver script) and every rank writes, per step, which networks' parameters changed, plus the Adam
step count of each parameter group. Expected on every rank: the generator changes on steps 0, 3, 6 only, the fake
score and the discriminator on every step, and the generator's optimizer state advanced 3 times (not 7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DRIVER = r"""
import json, os, sys
import lightning as L
import torch
from lit_gen.data.datamodule import ShardDataModule
from lit_gen.methods.fdistill import FDistill

teacher, shards, strategy_name, out = sys.argv[1:5]
NETS = ("net", "fake_net", "disc")


class Counter(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: [p.detach().clone() for p in getattr(module, n).parameters()] for n in NETS}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({n: any(not torch.equal(a, b) for a, b in zip(self.before[n], getattr(module, n).parameters()))
                          for n in NETS})

    def on_train_end(self, trainer, module):
        optimizer = trainer.optimizers[0]
        inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the torch one
        steps = {g["name"]: int(inner.state[g["params"][0]]["step"]) for g in inner.param_groups}
        Path = __import__("pathlib").Path
        Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rows": self.rows, "steps": steps, "optimizer": type(optimizer).__name__,
            "world_size": trainer.world_size, "updates": int(module.updates),
        }))


if strategy_name == "deepspeed":
    from lit_gen.scale.deepspeed_cpu import DeepSpeedCPUStrategy
    strategy = DeepSpeedCPUStrategy(stage=2)
else:
    strategy = "ddp"
torch.manual_seed(0)
model = FDistill(teacher=teacher, update_ratio=3, gan_weight=0.01,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=7, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Counter()], default_root_dir=out, gradient_clip_val=1.0)
trainer.fit(model, datamodule=ShardDataModule(shards=shards, batch_size=32, num_workers=0))
"""


def run_two_ranks(strategy: str, teacher: Path, shards: Path, tmp_path: Path) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if strategy == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(driver), str(teacher), str(shards), strategy, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_update_ratio_under_two_processes(strategy: str, toy_teacher_run: Path, toy_shards: Path, tmp_path) -> None:
    ranks = run_two_ranks(strategy, toy_teacher_run / "checkpoints" / "last.ckpt", toy_shards, tmp_path)
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["updates"] == 7
        assert [row["net"] for row in rank["rows"]] == [k % 3 == 0 for k in range(7)], rank["rows"]
        assert all(row["fake_net"] and row["disc"] for row in rank["rows"]), rank["rows"]
        assert rank["steps"] == {"generator": 3, "fake_score": 7, "discriminator": 7}
    if strategy == "deepspeed":
        assert "Zero" in ranks[0]["optimizer"] or "ZeRO" in ranks[0]["optimizer"], ranks[0]["optimizer"]
