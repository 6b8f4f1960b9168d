"""`lit-gen slurm` writes a requeue-safe sbatch file; scale overlays parse on top of every dataset's recipe."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest

from lit_gen.cli import lightning_cli
from lit_gen.errors import LitGenError
from lit_gen.scale.slurm import sbatch_script
from tests.conftest import REPO, run_cli

OVERLAYS = sorted((REPO / "recipes" / "scale").glob("*.yaml"))


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            options[key] = value
    return options


def test_slurm_file_for_two_nodes_of_eight_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "job.sbatch"
    args = ["-c", "recipes/cifar10/teacher.yaml", "-c", "recipes/scale/multinode.yaml", "--nodes", "2"]
    args += ["--gpus-per-node", "8", "--time", "04:00:00", "--partition", "gpu", "--out", out]
    args += ["--", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    run_cli("slurm", *args)
    script = out.read_text()
    options = sbatch_options(script)
    assert options["--nodes"] == "2" and options["--ntasks-per-node"] == "8" and options["--gpus-per-node"] == "8"
    assert options["--signal"] == "SIGUSR1@90" and "--requeue" in options and options["--time"] == "04:00:00"
    assert options["--partition"] == "gpu" and options["--output"] == f"{tmp_path / 'run'}/slurm/%x-%j.out"
    assert (tmp_path / "run" / "slurm").is_dir()  # SLURM cannot create the log folder itself
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    command = shlex.split(srun[0])
    fit = command.index("fit")
    assert command[fit - 2 : fit] == ["-m", "lit_gen.cli"]
    assert command[fit + 1 : fit + 5] == ["-c", "recipes/cifar10/teacher.yaml", "-c", "recipes/scale/multinode.yaml"]
    assert "--trainer.num_nodes=2" in command and "--trainer.devices=8" in command
    assert command[-2:] == ["--ckpt_path", "last"]
    assert f"--trainer.default_root_dir={tmp_path / 'run'}" in command


def test_slurm_refuses_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        run_cli(
            "slurm",
            "-c",
            "recipes/toy2d/teacher.yaml",
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
            "--",
            "--model.nope",
            "1",
        )
    assert "nope" in capsys.readouterr().err
    with pytest.raises(LitGenError, match="at least 1"):
        sbatch_script(["recipes/toy2d/teacher.yaml"], 0, 8)
    with pytest.raises(LitGenError, match="does not exist"):
        sbatch_script([str(tmp_path / "missing.yaml")], 1, 8)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_scale_overlays_parse_on_every_dataset(overlay: Path, tmp_path: Path) -> None:
    text = overlay.read_text()
    assert text.startswith("# ") and "Launch" in text[:800]
    for dataset in ("toy2d", "cifar10", "imagenet64"):
        args = ["-c", str(REPO / "recipes" / dataset / "teacher.yaml"), "-c", str(overlay)]
        config = lightning_cli(args, False, instantiate=False).config
        assert config.trainer.strategy is not None


def test_last_includes_the_newer_preemption_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    from callbacks.checkpoint import Checkpoint

    callback = Checkpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_3.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"y")
    os.utime(last, (time.time() - 100, time.time() - 100))
    found = callback._find_last_checkpoints(trainer)
    assert {str(last), str(hpc)} <= found
    assert max(found, key=os.path.getmtime) == str(hpc)
