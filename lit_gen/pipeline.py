"""Multi-stage pipelines (shards -> teacher -> students -> evaluation) that resume per stage.

A pipeline recipe (``recipes/pipelines/*.yaml``) lists stages; each stage is one of:

- ``shards``: ``{source, val_fraction, seed}`` -> ``lit-gen shards`` into ``OUT/<stage>/`` (``train/`` and ``val/``
  when ``val_fraction`` > 0);
- ``fit``: ``{recipe, data, teacher, args, tiny}`` -> ``lit-gen fit -c recipe`` into ``OUT/<stage>/``, on the shards of
  stage ``data``, distilling the last checkpoint of stage ``teacher`` (if given); ``args`` are ``--key value``
  overrides, ``tiny`` replaces/extends them in ``--tiny`` mode;
- ``eval``: ``{ref, n, tiny_n, floor, rows: [{model: STAGE, steps: [...], guidance}]}`` -> one metrics table,
  written to ``OUT/results.md`` (``OUT/results_<stage>.md`` for an eval stage not named ``eval``; with ``fd_ratio``:
  each row's FD over the FD of the first row's model at its most NFE — the student/teacher@35-NFE ratio), plus a
  sample grid ``OUT/<model>_<steps>step.png`` per row. When the ``ref`` stage
  has a validation split, the table starts with the real-data floor (``floor: true``, the default): the training split
  scored against the validation split like a model (row ``real train split``), so a saturated metric is visible.

At the end the runner writes ``OUT/report.html`` (``lit_gen.report``: table, grids, curves, configs); each finished
``fit`` stage logs one line with its time, final losses and checkpoint.

A stage that finished leaves ``OUT/<stage>/.done`` and is skipped when the pipeline runs again; an unfinished ``fit``
stage resumes from its ``last.ckpt`` (``--ckpt_path last``). Relative recipe paths resolve against the current folder,
then against the folder that holds ``recipes/``. ``lit-gen quickstart`` is this runner on
``recipes/pipelines/digits.yaml``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_gen.errors import LitGenError

DONE = ".done"
PIPELINE_KEYS = {"name", "description", "stages"}
STAGE_KINDS = {"shards", "fit", "eval"}
KEYS = {
    "shards": {"source", "val_fraction", "seed", "shard_size"},
    "fit": {"recipe", "data", "teacher", "args", "tiny"},
    "eval": {"ref", "n", "tiny_n", "rows", "metrics", "seed", "floor"},
}


@dataclass
class Stage:
    name: str
    kind: str
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pipeline:
    name: str
    stages: list[Stage]
    root: Path  # where relative recipe paths may also resolve (the folder holding recipes/)

    @classmethod
    def read(cls, path: str | Path) -> Pipeline:
        path = Path(path)
        if not path.is_file():
            raise LitGenError(f"pipeline recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise LitGenError(f"pipeline recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        unknown = set(data) - PIPELINE_KEYS
        if unknown:
            raise LitGenError(f"{path}: unknown pipeline keys {sorted(unknown)} (allowed: {sorted(PIPELINE_KEYS)})")
        stages, names = [], set()
        for i, entry in enumerate(data.get("stages") or []):
            kinds = STAGE_KINDS & set(entry)
            if "name" not in entry or len(kinds) != 1 or set(entry) - kinds - {"name"}:
                raise LitGenError(f"{path}: stage {i} needs a name and exactly one of {sorted(STAGE_KINDS)}: {entry}")
            kind = kinds.pop()
            spec = dict(entry[kind] or {})
            unknown = set(spec) - KEYS[kind]
            if unknown:
                raise LitGenError(f"{path}: stage {entry['name']}: unknown {kind} keys {sorted(unknown)}")
            for ref in ("data", "teacher", "ref"):
                if ref in spec and spec[ref] not in names:
                    raise LitGenError(f"{path}: stage {entry['name']} refers to {spec[ref]!r}, not an earlier stage")
            for row in spec.get("rows", []):
                if row.get("model") not in names:
                    raise LitGenError(f"{path}: eval row model {row.get('model')!r} is not an earlier stage")
            names.add(entry["name"])
            stages.append(Stage(entry["name"], kind, spec))
        if not stages:
            raise LitGenError(f"{path} has no stages")
        root = path.resolve().parent
        while root != root.parent and not (root / "recipes").is_dir():
            root = root.parent
        return cls(name=str(data.get("name", path.stem)), stages=stages, root=root)

    def resolve(self, recipe: str) -> Path:
        for candidate in (Path(recipe), self.root / recipe):
            if candidate.is_file():
                return candidate
        raise LitGenError(f"recipe {recipe} not found (looked in . and {self.root})")


def _args(mapping: dict[str, Any] | None) -> list[str]:
    out = []
    for key, value in (mapping or {}).items():
        out += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return out


class Runner:
    """Runs a ``Pipeline`` into ``out``; ``tiny`` uses each stage's ``tiny`` settings (a few minutes in all)."""

    def __init__(self, pipeline: Pipeline, out: str | Path, tiny: bool = False, log: Any = print) -> None:
        self.pipeline, self.out, self.tiny, self.log = pipeline, Path(out), tiny, log
        self.report: Path | None = None

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def train_shards(self, name: str) -> Path:
        folder = self.stage_dir(name)
        return folder / "train" if (folder / "train").is_dir() else folder

    def ref_shards(self, name: str) -> Path:
        folder = self.stage_dir(name)
        return folder / "val" if (folder / "val").is_dir() else self.train_shards(name)

    @staticmethod
    def results_name(stage: str) -> str:
        """``results.md`` for the stage named ``eval``, ``results_<stage>.md`` for any other eval stage (so
        pipelines run into one folder keep each other's tables)."""
        return "results.md" if stage == "eval" else f"results_{stage}.md"

    def last_checkpoint(self, name: str) -> Path:
        return self.stage_dir(name) / "checkpoints" / "last.ckpt"

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        total, start = len(self.pipeline.stages), time.time()
        for i, stage in enumerate(self.pipeline.stages, start=1):
            done = self.stage_dir(stage.name) / DONE
            if done.exists():
                self.log(f"[{i}/{total}] {stage.name}: done earlier, skipped")
                continue
            self.log(f"[{i}/{total}] {stage.name}: {stage.kind} ...")
            t0 = time.time()
            summary = getattr(self, f"_{stage.kind}")(stage)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(f"{time.time() - t0:.1f}\n")
            self.log(
                f"[{i}/{total}] {stage.name}: finished in {time.time() - t0:.0f}s (total {time.time() - start:.0f}s)"
                + (f"; {summary}" if summary else "")
            )
        self.write_report()
        return self.out / "results.md"

    def write_report(self) -> Path | None:
        """``OUT/report.html`` (``lit-gen report OUT``): the metrics table, grids, curves and configs."""
        from lit_gen.report import write_report

        try:
            self.report = write_report(self.out)
        except LitGenError as err:  # e.g. a pipeline of shards only: nothing trained, nothing to show
            self.log(f"no report: {err}")
            return None
        return self.report

    def fit_summary(self, name: str) -> str:
        """One line about a finished fit stage: its final logged losses and its checkpoint."""
        from lit_gen.report import last_values

        losses = last_values(self.stage_dir(name), "train/loss")
        text = ", ".join(f"{tag.removeprefix('train/')} {value:.4g}" for tag, value in losses.items())
        return f"final {text or 'loss not logged'}; checkpoint {self.last_checkpoint(name)}"

    # ------------------------------------------------------------------------------------------------------ stages
    def _shards(self, stage: Stage) -> None:
        from lit_gen.cli import main

        spec = stage.spec
        args = ["shards", str(spec["source"]), "--out", str(self.stage_dir(stage.name))]
        if spec.get("val_fraction"):
            args += ["--val-fraction", str(spec["val_fraction"])]
        if "seed" in spec:
            args += ["--seed", str(spec["seed"])]
        if "shard_size" in spec:
            args += ["--shard-size", str(spec["shard_size"])]
        main(args)

    def _fit(self, stage: Stage) -> None:
        from lit_gen.cli import main

        spec = stage.spec
        args = ["fit", "-c", str(self.pipeline.resolve(spec["recipe"]))]
        args += ["--trainer.default_root_dir", str(self.stage_dir(stage.name))]
        if spec.get("data"):
            args += ["--data.init_args.shards", str(self.train_shards(spec["data"]))]
        if spec.get("teacher"):
            args += ["--model.init_args.teacher", str(self.last_checkpoint(spec["teacher"]))]
        overrides = dict(spec.get("args") or {})
        if self.tiny:
            overrides.update(spec.get("tiny") or {})
        if self.tiny and "trainer.log_every_n_steps" not in overrides:
            overrides["trainer.log_every_n_steps"] = 5  # a few dozen steps: still some points on the report's curves
        args += _args(overrides)
        args += ["--ckpt_path", "last"]  # an unfinished stage resumes; a fresh one starts from scratch
        from callbacks.preemption import LAST_STOP

        LAST_STOP.clear()
        main(args)
        if LAST_STOP:  # SIGTERM / SIGUSR1: the fit saved and returned early; the stage is not done
            raise LitGenError(
                f"stage {stage.name} was stopped by {LAST_STOP[-1]} (checkpoint saved); run the pipeline again "
                "to resume it"
            )
        if not self.last_checkpoint(stage.name).exists():
            raise LitGenError(f"stage {stage.name} finished without writing {self.last_checkpoint(stage.name)}")
        return self.fit_summary(stage.name)

    def _eval(self, stage: Stage) -> None:
        import torch

        from lit_gen.eval import Evaluator, format_table
        from lit_gen.export import load_model
        from lit_gen.viz import samples_picture, save_png

        spec = stage.spec
        n = int(spec.get("tiny_n" if self.tiny else "n", spec.get("n", 1000)))
        evaluator = Evaluator(self.ref_shards(spec["ref"]), spec.get("metrics"), seed=int(spec.get("seed", 0)))
        rows = []
        train, ref = self.train_shards(spec["ref"]), self.ref_shards(spec["ref"])
        if spec.get("floor", True) and train != ref:
            self.log(f"    real-data floor: {n} training samples against {ref} ...")
            rows.append(evaluator.score_real(train, n))
        for row in spec["rows"]:
            model = load_model(self.last_checkpoint(row["model"]))
            for steps in row.get("steps") or [None]:
                self.log(f"    {row['model']}: sampling {n} at {steps or 'default'} steps ...")
                try:
                    rows += evaluator.evaluate(
                        model, steps=[steps], n=n, seed=int(spec.get("seed", 0)), name=row["model"]
                    )
                except LitGenError as err:  # e.g. a 1-step TRACT student asked for 2 steps: not a jump it learned
                    self.log(f"    {row['model']}: {steps} steps skipped: {err}")
                    continue
                with torch.no_grad():
                    pictures = model.sample(64, steps=steps, seed=0)
                kind = model.data_info["kind"]
                save_png(samples_picture(pictures, kind), self.out / f"{row['model']}_{rows[-1]['steps']}step.png")
        note = add_fd_ratio(rows, spec["rows"][0]["model"])
        table = format_table(rows)
        mode = "tiny (--tiny: a smoke test, numbers are not meaningful)" if self.tiny else "full"
        text = f"# {self.pipeline.name} pipeline results\n\nMode: {mode}. Reference: {self.ref_shards(spec['ref'])}, "
        text += f"{n} generated samples per row.{note}\n\n{table}\n"
        (self.out / self.results_name(stage.name)).write_text(text)
        self.log(table)


def add_fd_ratio(rows: list[dict[str, Any]], reference_model: str) -> str:
    """Add ``fd_ratio`` = FD / FD of ``reference_model`` at its largest NFE to every row with an FD; returns a
    sentence naming the reference (empty when there is none)."""
    refs = [r for r in rows if r.get("model") == reference_model and isinstance(r.get("fd"), (int, float))]
    if not refs:
        return ""
    ref = max(refs, key=lambda r: r.get("nfe", 0))
    if not ref["fd"] > 0:
        return ""
    for row in rows:
        if isinstance(row.get("fd"), (int, float)):
            row["fd_ratio"] = row["fd"] / ref["fd"]
    return f" fd_ratio: FD over the FD of {reference_model} at {ref.get('nfe')} NFE."
