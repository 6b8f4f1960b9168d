"""benchmarks/gpu.py --tiny (the GPU benchmark's code on the CPU) and the Compile callback it times."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from callbacks.compile import Compile, to_channels_last
from lit_gen.errors import LitGenError
from lit_gen.nets import UNet
from tests.conftest import REPO


def test_gpu_benchmark_tiny_runs_every_cell(tmp_path):
    """Every recipe x variant and both engines run through `lit-gen fit` and land in one table with FLOPs counted."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    cells = {(r["method"], r["variant"]) for r in rows if "step_s" in r}
    methods = ("teacher", "tract", "cd", "fdistill", "sct", "scd", "meanflow")
    expected = {(m, v) for m in methods for v in ("eager", "cl", "compile+cl")}
    assert cells == expected | {("teacher", "ddp"), ("teacher", "zero2")}, [r.get("error") for r in rows]
    flops = {r["method"]: r["flops"] for r in rows if r.get("flops")}
    assert set(flops) == set(methods)
    # TRACT's and CD's steps run the student and a frozen teacher: more model FLOPs than the teacher's own step;
    # sCD is sCT plus the teacher's forward (the JVP recipes under bf16 autocast: the GroupNorm dtype defect)
    assert flops["tract"] > flops["teacher"] and flops["cd"] > flops["teacher"]
    assert flops["scd"] > flops["sct"] > flops["teacher"]
    assert "| teacher | zero2 |" in proc.stdout and "GFLOP/step" in proc.stdout


def _tiny_unet() -> UNet:
    return UNet(img_resolution=8, in_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0)  # fmt: skip


def test_channels_last_keeps_values_and_state_dict():
    torch.manual_seed(0)
    net = _tiny_unet()
    for p in net.parameters():  # a fresh UNet's output layer is zero: give it weights so outputs differ from 0
        p.data.normal_(0, 0.05)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    before, keys = net(x, c, None), list(net.state_dict())
    to_channels_last(net)
    assert list(net.state_dict()) == keys
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    torch.testing.assert_close(net(x, c, None), before, rtol=1e-5, atol=1e-5)


def test_compile_in_place_keeps_parameter_names():
    net = _tiny_unet()
    keys = list(net.state_dict())
    net.compile(backend="eager")
    assert list(net.state_dict()) == keys  # checkpoints and EMA copies see the uncompiled names


def test_compile_callback_bad_input_is_one_line():
    with pytest.raises(LitGenError, match="does nothing"):
        Compile(compile=False, channels_last=False)

    class NoNets(torch.nn.Module):
        pass

    with pytest.raises(LitGenError, match="found none of the networks"):
        Compile(backend="eager").on_fit_start(None, NoNets())  # type: ignore[arg-type]
