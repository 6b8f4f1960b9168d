"""Checkpoints are committed atomically: a kill leaves the previous complete checkpoint or the new one, never a torn
file; a folder checkpoint killed between its two renames is repaired when "last" is looked up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from callbacks.checkpoint import Checkpoint, commit
from lit_gen.export import read_checkpoint


def test_commit_replaces_file_and_folder(tmp_path: Path) -> None:
    final = tmp_path / "last.ckpt"
    final.write_bytes(b"old")
    partial = tmp_path / "last.ckpt.partial"
    partial.write_bytes(b"new")
    commit(partial, final)
    assert final.read_bytes() == b"new" and not partial.exists()

    folder, partial_folder = tmp_path / "ds.ckpt", tmp_path / "ds.ckpt.partial"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "a.pt").write_bytes(b"old")
    (partial_folder / "checkpoint").mkdir(parents=True)
    (partial_folder / "checkpoint" / "a.pt").write_bytes(b"new")
    commit(partial_folder, folder)
    assert (folder / "checkpoint" / "a.pt").read_bytes() == b"new"
    assert not partial_folder.exists() and not (tmp_path / "ds.ckpt.old").exists()


def test_folder_swap_interrupted_between_renames_is_repaired(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "last.ckpt.old" / "checkpoint").mkdir(parents=True)  # the state a kill between renames leaves
    callback = Checkpoint(dirpath=checkpoints, save_last=True)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
    assert str(checkpoints / "last.ckpt") in callback._find_last_checkpoints(trainer)
    assert (checkpoints / "last.ckpt" / "checkpoint").is_dir()


@pytest.mark.slow
def test_fit_leaves_no_partial_files_and_a_readable_last(toy_shards: Path, tmp_path: Path) -> None:
    from tests.conftest import fit_toy_teacher

    fit_toy_teacher(toy_shards, tmp_path, 120)  # saves at step 100 (interval) and 120 (final)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.ckpt"]
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 120 and isinstance(
        checkpoint["state_dict"]["net.proj_out.weight"], torch.Tensor
    )
