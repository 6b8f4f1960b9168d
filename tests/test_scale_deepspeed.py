"""DeepSpeed ZeRO-2 on 2 CPU processes and a 2-"node" DDP run on this machine: fit -> resume -> export -> teacher.

Marked multiprocess (they still run in CI). DeepSpeed needs DS_ACCELERATOR=cpu before it is imported, so every run
is a subprocess of `lit-gen`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_gen.errors import LitGenError
from lit_gen.export import export, load_model, read_checkpoint, read_model_file
from lit_gen.methods.distill import DistillationMethod
from tests.cli_runs import TouchExploit, run_lit_gen
from tests.cli_runs import toy_teacher_fit as toy_fit
from tests.conftest import REPO

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
DS_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=2", "-c", str(REPO / "recipes/scale/deepspeed_cpu.yaml")]


def lit_gen(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_lit_gen(*args, env={"DS_ACCELERATOR": "cpu", **(env or {})}, timeout=timeout)


def test_deepspeed_cpu_fit_resume_export_teacher(toy_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    lit_gen(*toy_fit(toy_shards, root, 20, *DS_CPU))
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "latest").is_file()  # a DeepSpeed folder, committed atomically
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    lit_gen(*toy_fit(toy_shards, root, 30, *DS_CPU), "--ckpt_path", "last")
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 30 and checkpoint["lit_gen"]["method"] == "teacher"

    # Exported raw weights equal DeepSpeed's own consolidated fp32 weights (its converter, trusted here).
    raw_file = export(last, tmp_path / "raw.safetensors", weights="raw")
    ema_file = export(last, tmp_path / "ema.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(last))
    _, raw = read_model_file(raw_file, "raw")
    assert raw and all(torch.equal(v, consolidated[f"net.{k}"]) for k, v in raw.items() if f"net.{k}" in consolidated)
    _, ema = read_model_file(ema_file)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert torch.isfinite(load_model(ema_file).sample(16, steps=4)).all()

    # The folder itself and the exported file both work as a distillation teacher.
    for teacher in (last, ema_file):
        student = DistillationMethod(teacher=str(teacher))
        for k, v in student.net.state_dict().items():
            assert torch.equal(v, ema[k]), k

    # A damaged or hostile model-states file in a copy of the folder: one line naming the file, nothing executed.
    states = next((last / "checkpoint").glob("*model_states.pt")).relative_to(last)
    for name, payload, expected in (
        ("damaged", bytes(range(256)) * 8, "cannot read DeepSpeed checkpoint file"),
        ("hostile", pickle.dumps(TouchExploit(tmp_path / "pwned")), "refusing to load DeepSpeed checkpoint file"),
    ):
        copy = tmp_path / name / "last.ckpt"
        shutil.copytree(last, copy)
        (copy / states).write_bytes(payload)
        with pytest.raises(LitGenError) as info:
            read_checkpoint(copy)
        message = str(info.value)
        assert expected in message and str(copy / states) in message and "\n" not in message, message
    assert not (tmp_path / "pwned").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_process_each_fit_resume_export(toy_shards: Path, tmp_path: Path) -> None:
    """Lightning's env-var cluster settings (LightningEnvironment): each "node" is one external process."""
    root = tmp_path / "nodes"

    def run_nodes(steps: int, *extra: str) -> None:
        port = str(free_port())
        procs = []
        for node in (0, 1):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}  # fmt: skip
            args = toy_fit(toy_shards, root, steps, "--trainer.accelerator=cpu", "--trainer.num_nodes=2",
                           "--trainer.devices=1", "--trainer.strategy=ddp", *extra)  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-m", "lit_gen.cli", *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]

    run_nodes(20)
    run_nodes(30, "--ckpt_path", "last")
    last = root / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 30
    model = load_model(export(last, tmp_path / "nodes.safetensors"))
    assert torch.isfinite(model.sample(16, steps=4)).all()


def test_deepspeed_cpu_stage3_fit_export(toy_shards: Path, tmp_path: Path) -> None:
    """ZeRO-3 partitions the parameters: the EMA gathers them, the export consolidates them."""
    root = tmp_path / "ds3"
    lit_gen(*toy_fit(toy_shards, root, 10, *DS_CPU, "--trainer.strategy.init_args.stage=3"))
    last = root / "checkpoints" / "last.ckpt"
    assert (last / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    description, ema = read_model_file(last)
    _, raw = read_model_file(last, "raw")
    assert description["weights"] == "ema" and ema.keys() == raw.keys()
    assert all(ema[k].shape == raw[k].shape and ema[k].numel() > 0 for k in raw)
    assert torch.isfinite(load_model(export(last, tmp_path / "ds3.safetensors")).sample(16, steps=4)).all()


def test_deepspeed_teacher_folder_distils_and_fdistill_resumes_under_zero2(toy_shards: Path, tmp_path: Path) -> None:
    """A DeepSpeed teacher folder feeds a distillation (5 TRACT steps); f-distill's three networks under one
    optimizer fit, resume and export under ZeRO-2; a ZeRO folder refuses another world size."""
    teacher = tmp_path / "teacher"
    lit_gen(*toy_fit(toy_shards, teacher, 10, *DS_CPU))
    folder = teacher / "checkpoints" / "last.ckpt"
    common = [f"--data.init_args.shards={toy_shards}", "--trainer.enable_progress_bar=false",
              "--data.init_args.batch_size=128", f"--model.init_args.teacher={folder}"]  # fmt: skip
    tract = tmp_path / "tract"
    lit_gen("fit", "-c", str(REPO / "recipes/toy2d/tract.yaml"), *common, f"--trainer.default_root_dir={tract}",
            "--trainer.max_steps=5")  # fmt: skip
    assert read_checkpoint(tract / "checkpoints" / "last.ckpt")["global_step"] == 5

    student = tmp_path / "fdistill"
    fdistill = [
        "fit",
        "-c",
        str(REPO / "recipes/toy2d/fdistill.yaml"),
        *common,
        f"--trainer.default_root_dir={student}",
    ]
    lit_gen(*fdistill, "--trainer.max_steps=6", *DS_CPU)
    lit_gen(*fdistill, "--trainer.max_steps=10", *DS_CPU, "--ckpt_path", "last")
    last = student / "checkpoints" / "last.ckpt"
    assert last.is_dir() and read_checkpoint(last)["global_step"] == 10
    assert torch.isfinite(load_model(export(last, tmp_path / "fd.safetensors")).sample(16)).all()

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    args = [*fdistill, "--trainer.max_steps=12", *DS_CPU, "--trainer.devices=1", "--ckpt_path", "last"]
    proc = subprocess.run([sys.executable, "-m", "lit_gen.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "written by 2 DeepSpeed ranks but this run has 1" in proc.stderr
    assert "Traceback" not in proc.stderr
