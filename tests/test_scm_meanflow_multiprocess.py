"""sCD and MeanFlow under 2-process DDP and DeepSpeed ZeRO-2 on CPU (gloo): one optimizer step of the two ranks equals
the single-process step on the mean of the two ranks' losses (each rank's batch and its own per-rank RNG stream).

The JVP runs on the plain module inside the strategy's wrapper (``self.net`` in ``training_step``), so this also
checks that forward-mode AD and the strategies' gradient hooks coexist. SGD keeps the comparison linear in the
gradient (Adam's first step is sign-like and would magnify all-reduce rounding).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_scm_method import write_teacher

DRIVER = r"""
import sys
import lightning as L
import torch
from torch.utils.data import DataLoader
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[5])
from tests.test_scm_meanflow_multiprocess import make_method, dataset

method_name, teacher, strategy_name, out = sys.argv[1:5]
if strategy_name == "deepspeed":
    from lit_gen.scale.deepspeed_cpu import DeepSpeedCPUStrategy
    strategy = DeepSpeedCPUStrategy(stage=2)
else:
    strategy = "ddp"
model = make_method(method_name, teacher)


class Save(L.Callback):
    def on_train_end(self, trainer, module):
        if trainer.global_rank == 0:
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items() if not k.startswith("teacher")}
            save_file(state, out)


rank = int(__import__("os").environ.get("LOCAL_RANK", 0))  # Lightning re-runs this script for rank 1
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                    use_distributed_sampler=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Save()], default_root_dir=str(__import__("pathlib").Path(out).parent))
trainer.fit(model, train_dataloaders=DataLoader(dataset()[rank::2], batch_size=16, shuffle=False))
"""

BATCH = 16  # per rank


def dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4 * BATCH, 2, generator=gen) * 0.5
    return [{"x": row} for row in x]


def make_method(name: str, teacher: str) -> torch.nn.Module:
    from lit_gen.methods.meanflow import MeanFlowTraining
    from lit_gen.methods.scm import SCM
    from lit_gen.nets import MLPDenoiser

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05)

    torch.manual_seed(0)
    if name == "scd":
        method = SCM(teacher=teacher, tangent_warmup_steps=0, optimizer=sgd)
    else:
        net = MLPDenoiser(dim=2, hidden=32, depth=2, emb_dim=16, aux_time=True)
        with torch.no_grad():  # a non-trivial start (the zero output layer would make the first step degenerate)
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        method = MeanFlowTraining(net=net, optimizer=sgd)
    method.data_info = {"shape": [2], "num_classes": 0, "kind": "points", "normalization": None}
    return method


def single_process_step(name: str, teacher: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """The step both ranks take, done in one process: rank r's batch is samples r, r + 2, … (the driver's split)
    and its RNG stream is seeded with rank r; the gradient is the mean of the two."""
    method = make_method(name, teacher)
    method.train()
    rows = torch.stack([row["x"] for row in dataset()])
    rank = {"r": 0}
    monkeypatch.setattr(type(method), "global_rank", property(lambda self: rank["r"]))
    losses = []
    for r in (0, 1):
        rank["r"] = r
        batch = rows[r::2][:BATCH]
        with torch.random.fork_rng():
            torch.manual_seed(method.step_seed())
            loss_fn = method.scm_loss if name == "scd" else method.meanflow_loss
            losses.append(loss_fn(batch, None).mean())
    optimizer = method.configure_optimizers()
    optimizer.zero_grad()
    (0.5 * (losses[0] + losses[1])).backward()
    optimizer.step()
    return {k: v.detach() for k, v in method.state_dict().items() if not k.startswith("teacher")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
@pytest.mark.parametrize("name", ["scd", "meanflow"])
def test_two_process_step_equals_single_process_step(
    name: str, strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    teacher = str(write_teacher(tmp_path / "teacher.ckpt"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "after.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if strategy == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(driver), name, teacher, strategy, str(out), str(REPO)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    two = load_file(str(out))
    one = single_process_step(name, teacher, monkeypatch)
    start = {k: v for k, v in make_method(name, teacher).state_dict().items() if not k.startswith("teacher")}
    moved = [k for k in one if not torch.equal(one[k], start[k])]
    assert moved, "the step changed nothing"
    for key in one:
        step = (one[key] - start[key]).abs().max()
        diff = (two[key] - one[key]).abs().max()
        assert diff <= 1e-6 + 1e-4 * step, f"{key}: two-process vs one-process {diff:.3g} (the step moved {step:.3g})"
