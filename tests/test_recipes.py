"""Recipes are tested data: every YAML in recipes/ parses, instantiates, and (where a CPU can) trains a step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lit_gen.cli import lightning_cli
from lit_gen.data.shards import write_shards
from tests.conftest import REPO

TRAIN_RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name not in ("scale", "pipelines"))
# GPU-scale recipes: instantiated on the CPU with tiny random shards of the recipe's data shape.
# recipes/imported: their teachers are files the user imports (absent here): parsed, like other big-teacher recipes.
IMAGE_SHAPES = {"cifar10": (3, 32, 32, 10), "imagenet64": (3, 64, 64, 1000), "imported": (3, 32, 32, 10)}
RUN_ONE_STEP = {"toy2d", "digits", "cifar10"}  # imagenet64's network is too big for a quick CPU step
# A JVP step (MeanFlow) of the 56M-parameter CIFAR net took ~3.5 min here: instantiated and checked, not trained.
INSTANTIATE_ONLY = {"cifar10/meanflow"}


def test_there_are_recipes() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in TRAIN_RECIPES}
    assert {"toy2d/teacher.yaml", "digits/teacher.yaml", "cifar10/teacher.yaml", "imagenet64/teacher.yaml"} <= names


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory: pytest.TempPathFactory, toy_shards: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe_data")
    data = {"toy2d": toy_shards}
    write_shards("builtin:digits", root / "digits")
    data["digits"] = root / "digits"
    rng = np.random.default_rng(0)
    for name, (c, h, w, classes) in IMAGE_SHAPES.items():
        images = rng.integers(0, 256, size=(4, h, w, c), dtype=np.uint8)
        labels = np.array([0, 1, 2, classes - 1], dtype=np.int64)
        np.savez(root / f"{name}.npz", x=images, y=labels)
        write_shards(str(root / f"{name}.npz"), root / name)
        data[name] = root / name
    return data


def is_distillation(recipe: Path) -> bool:
    model = yaml.safe_load(recipe.read_text())["model"]
    return "teacher" in (model.get("init_args") or {})


@pytest.fixture(scope="module")
def teachers(recipe_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A teacher .ckpt per dataset, built (untrained) from the dataset's teacher recipe: what distillation recipes
    of that dataset take as ``model.teacher``."""
    root, made = tmp_path_factory.mktemp("teachers"), {}

    def teacher(dataset: str) -> Path:
        if dataset not in made:
            cli = lightning_cli(
                cpu_args(REPO / "recipes" / dataset / "teacher.yaml", recipe_data[dataset], root), False
            )
            cli.model.attach_data(cli.datamodule.info)
            made[dataset] = root / f"{dataset}.ckpt"
            torch.save({"state_dict": cli.model.state_dict(), "lit_gen": cli.model.describe()}, made[dataset])
        return made[dataset]

    return teacher


def cpu_args(recipe: Path, shards: Path, root: Path) -> list[str]:
    return [
        "-c",
        str(recipe),
        "--data.init_args.shards",
        str(shards),
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_instantiates_and_trains(
    recipe: Path, recipe_data: dict[str, Path], teachers: Callable[[str], Path], tmp_path: Path
) -> None:
    header = recipe.read_text().split("\n", 8)
    assert header[0].startswith("# ") and any("Launch" in line for line in header), "recipe must name paper + launch"
    dataset = recipe.parent.name
    args = cpu_args(recipe, recipe_data[dataset], tmp_path)
    if is_distillation(recipe):
        if dataset not in RUN_ONE_STEP:  # a full-size teacher of this dataset is too big to build here: parse only
            assert lightning_cli([*args, "--model.init_args.teacher", "unused.ckpt"], False, instantiate=False).config
            return
        args += ["--model.init_args.teacher", str(teachers(dataset))]
        if "guidance_stage_one" in recipe.read_text():
            # stage one regresses onto the guided teacher; this untrained teacher's zero output layer makes every
            # guided x̂ equal the student's own (zero loss, zero gradient): train the method's own loss instead
            args += ["--model.init_args.guidance_stage_one", "0"]
    cli = lightning_cli(args, run=False)
    cli.model.attach_data(cli.datamodule.info)  # the data shape and classes fit the network
    name = f"{dataset}/{recipe.stem}"
    if dataset not in RUN_ONE_STEP or (is_distillation(recipe) and dataset == "cifar10") or name in INSTANTIATE_ONLY:
        return  # a distillation step of the 56M-parameter CIFAR net costs ~45 s here: instantiation only
    trainable = [p for p in cli.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() or dataset != "toy2d"
