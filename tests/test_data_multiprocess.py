"""Two-process DDP on CPU (gloo), 2 DataLoader workers per rank: resampled streams never hang with fewer shards than
ranks x workers and their checkpoint holds both ranks' positions; exact-epoch streams are disjoint and cover the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lit_gen.data.shards import write_shards
from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import lightning as L
    import torch
    from lit_gen.data.datamodule import ShardDataModule

    one_shard, four_shards, out = sys.argv[1:4]

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(hashlib.sha1(batch["x"].numpy().tobytes()).hexdigest())
            return self.lin(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    # Resampled: 1 shard for 2 ranks x 2 workers; 3 epochs of 4 steps must finish on both ranks.
    dm = ShardDataModule(one_shard, batch_size=16, num_workers=2, steps_per_epoch=4, shuffle_buffer=50)
    module = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(f"{out}/ddp.ckpt")
    rank = trainer.global_rank

    # Exact epochs, read straight from the DataModule on each rank of the same process group.
    exact = ShardDataModule(four_shards, batch_size=7, num_workers=2, resampled=False, shuffle_buffer=20)
    rows = [tuple(r) for b in exact.train_dataloader() for r in b["x"].tolist()]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"resampled": module.seen, "exact": rows, "batches": exact.num_batches_per_epoch()}, f)
    """
)


@pytest.mark.multiprocess
def test_two_ranks_two_workers(tmp_path):
    write_shards("builtin:toy2d:gmm8:300", tmp_path / "one", shard_size=1000)
    write_shards("builtin:toy2d:gmm8:400", tmp_path / "four", shard_size=100)
    script = tmp_path / "ddp_data.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "four"), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a hang fails here instead of blocking CI
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # resampled: 12 steps on each rank, different streams per rank, no repeated batch within a rank
    assert [len(r["resampled"]) for r in ranks] == [12, 12]
    assert not set(ranks[0]["resampled"]) & set(ranks[1]["resampled"])
    assert all(len(set(r["resampled"])) == 12 for r in ranks)

    # exact epochs: 4 shards over 2 ranks x 2 workers -> 100 samples per worker, disjoint across ranks, covering all
    assert [r["batches"] for r in ranks] == [2 * 15, 2 * 15]  # ceil(100 / 7) batches per worker
    a, b = ({tuple(x) for x in r["exact"]} for r in ranks)
    assert len(ranks[0]["exact"]) == len(a) == 200 and len(b) == 200
    assert not a & b and len(a | b) == 400

    import torch

    state = torch.load(tmp_path / "ddp.ckpt", map_location="cpu", weights_only=True)["ShardDataModule"]["train_stream"]
    assert state["world_size"] == 2 and state["delivered"] == 12
    assert sorted(state["raw"]) == ["0", "1"] and all(sorted(v) == ["0", "1"] for v in state["raw"].values())
