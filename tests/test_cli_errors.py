"""Bad input gets one clear line on stderr and exit status 2 — never a traceback, never an executed pickle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runs import TouchExploit
from tests.conftest import REPO, run_cli


def _error_line(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _run_entry_point(*args: object) -> str:
    """`python -m lit_gen.cli ARGS` in a subprocess: exit status 2, one error line, no traceback; returns it."""
    result = subprocess.run(
        [sys.executable, "-m", "lit_gen.cli", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lit-gen: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_unknown_recipe_key(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    text = (REPO / "recipes/toy2d/teacher.yaml").read_text().replace("    warmup_steps: 100", "    warmup_stepz: 100")
    recipe.write_text(text)
    assert "warmup_stepz" in _run_entry_point("fit", "-c", recipe)
    assert "max_stepz" in _run_entry_point("fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--trainer.max_stepz", 3)
    line = _run_entry_point("fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--trainer.max_steps", "abc")
    assert "max_steps" in line and "abc" in line


def test_missing_shards(tmp_path: Path) -> None:
    line = _run_entry_point(
        "fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--data.init_args.shards", tmp_path / "nowhere"
    )
    assert "nowhere" in line and "does not exist" in line


def test_random_bytes_are_never_a_traceback(tmp_path: Path) -> None:
    """Random bytes make torch's weights-only unpickler fail as IndexError, KeyError, UnicodeDecodeError, ...
    (a CI run once drew an IndexError): every one must come back as a LitGenError naming the file."""
    import random

    from lit_gen.errors import LitGenError
    from lit_gen.export import read_checkpoint

    garbage = tmp_path / "garbage.ckpt"
    for seed in range(300):
        rng = random.Random(seed)
        garbage.write_bytes(rng.randbytes(rng.choice([1, 7, 100, 2000])))
        with pytest.raises(LitGenError, match="garbage.ckpt") as info:
            read_checkpoint(garbage)
        assert "\n" not in str(info.value)


def test_unreadable_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 8)
    err = _error_line(capsys, "sample", "--ckpt", garbage, "--out", tmp_path / "x.png")
    assert err.startswith("lit-gen: error:") and "garbage.ckpt" in err and len(err.strip().splitlines()) == 1
    err = _error_line(capsys, "sample", "--ckpt", tmp_path / "missing.ckpt", "--out", tmp_path / "x.png")
    assert "does not exist" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = _error_line(capsys, "export", "--ckpt", bad, "--out", tmp_path / "y.safetensors")
    assert "bad.safetensors" in err


def test_pickle_that_runs_code_is_refused_and_nothing_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    import torch

    torch.save({"state_dict": {}, "lit_gen": {}, "payload": TouchExploit(str(marker))}, evil)
    err = _error_line(capsys, "sample", "--ckpt", evil, "--out", tmp_path / "x.png")
    assert "refusing" in err or "cannot read" in err
    assert not marker.exists()


def test_unknown_builtin_from_the_entry_point(tmp_path: Path) -> None:
    assert "no_such_mixture" in _run_entry_point("shards", "builtin:toy2d:no_such_mixture", "--out", tmp_path / "o")


def test_resuming_from_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": TouchExploit(str(marker))}}, evil)
    line = _run_entry_point("fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--ckpt_path", evil)
    assert "refusing" in line
    assert not marker.exists()


def test_sample_refuses_zero_samples_or_steps(capsys: pytest.CaptureFixture[str], toy_teacher_run: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    assert "--n must be at least 1, got 0" in _error_line(capsys, "sample", "--ckpt", ckpt, "--n", 0, "--out",
                                                             tmp_path / "x.npy")  # fmt: skip
    # --steps 0 used to fall back to the model's default step count silently (0 is falsy).
    assert "--steps must be at least 1, got 0" in _error_line(capsys, "sample", "--ckpt", ckpt, "--steps", 0, "--out",
                                                                 tmp_path / "x.npy")  # fmt: skip
    assert not (tmp_path / "x.npy").exists()


def test_unusable_device_is_one_line(capsys: pytest.CaptureFixture[str], toy_teacher_run: Path, tmp_path: Path) -> None:
    ckpt = toy_teacher_run / "checkpoints" / "last.ckpt"
    err = _error_line(capsys, "sample", "--ckpt", ckpt, "--device", "nosuchdevice", "--out", tmp_path / "x.npy")
    assert "--device nosuchdevice is not usable here" in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_shape_are_one_line(capsys: pytest.CaptureFixture[str], toy_teacher_run: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    """A file whose tensors do not fit the network it describes (e.g. written by another lit_gen version): one line
    naming the file, the tensor and both shapes — not torch's multi-line load_state_dict error."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    exported = tmp_path / "teacher.safetensors"
    run_cli("export", "--ckpt", toy_teacher_run / "checkpoints" / "last.ckpt", "--out", exported)
    with safe_open(str(exported), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    damaged = tmp_path / "other_version.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    err = _error_line(capsys, "sample", "--ckpt", damaged, "--out", tmp_path / "x.npy")
    assert "other_version.safetensors" in err and key in err and "another shape" in err
    assert len(err.strip().splitlines()) == 1
