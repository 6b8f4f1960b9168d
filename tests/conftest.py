"""Shared fixtures: small shards made by `lit-gen shards`, and one short toy2d teacher run reused by several tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Every test starts from the same global RNG states (torch, numpy, random), so a test draws the same numbers
    whether it runs in the whole suite, in `-m "not slow"` or alone (numpy and random would otherwise start from OS
    entropy, and torch from wherever the previous test left it)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def run_cli(*args: str) -> None:
    """Run `lit-gen ARGS` in-process (raises SystemExit on a CLI error)."""
    from lit_gen.cli import main

    main([str(a) for a in args])


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "toy2d_gmm8"
    run_cli("shards", "builtin:toy2d:gmm8:20000", "--out", out, "--shard-size", "5000")
    return out


def fit_toy_teacher(shards: Path, root: Path, max_steps: int, *extra: object) -> None:
    """`lit-gen fit` of the real toy2d recipe on ``shards`` into ``root`` for ``max_steps`` steps."""
    run_cli(
        "fit", "-c", REPO / "recipes/toy2d/teacher.yaml", "--data.init_args.shards", shards,
        "--trainer.default_root_dir", root, "--trainer.max_steps", max_steps,
        "--trainer.enable_progress_bar", "false", *extra,
    )  # fmt: skip


@pytest.fixture(scope="session")
def toy_teacher_run(tmp_path_factory: pytest.TempPathFactory, toy_shards: Path) -> Path:
    """A 600-step toy2d teacher from the real recipe (about 45 s), lr decayed to 0 at step 600; its root dir."""
    root = tmp_path_factory.mktemp("runs") / "toy_teacher"
    fit_toy_teacher(toy_shards, root, 600, "--model.init_args.decay_steps", 600)
    return root
