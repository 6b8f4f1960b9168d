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
stage resumes from its ``last.ckpt`` (``--ckpt_path last``). ``.done`` records the stage's settings: its entry in the
recipe, the parsed content of a fit's recipe file, ``--tiny``, and the settings of every stage it reads (so a change
upstream reaches it). A finished stage whose settings changed since it ran is run again, its old outputs moved to
``OUT/.previous/<stage>-<time>/`` (kept, never deleted; the report does not read them). Relative recipe paths
resolve against the current folder, then against the folder that holds ``recipes/``. ``lit-gen quickstart`` is this
runner on ``recipes/pipelines/digits.yaml``.

``jobs`` > 1 (``lit-gen pipeline --jobs N``; ``lit-gen quickstart`` defaults to ``auto_jobs``: all the fit stages
that can run at once, up to two per core) runs up to N ``fit`` stages at once, each as its own ``lit-gen fit``
process logging to ``OUT/<stage>/fit.log``. A stage starts once the stages it names (``data``, ``teacher``; an
eval's ``ref`` and row models) are done, in recipe order; each process gets the CPU cores divided among the stages
that can run at that moment (``OMP_NUM_THREADS``, unless you set it), so a lone teacher still gets every core and
the three quickstart students share them. After a failure no new stage starts, the running ones finish, and the
error names the stage and its log. SIGTERM / SIGUSR1 to the pipeline is passed on to every running fit, which
checkpoints; under SLURM the job is requeued once, after all of them saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_gen.errors import LitGenError

DONE = ".done"
PREVIOUS = ".previous"  # OUT/.previous/<stage>-<time>/: the outputs of a finished stage whose settings changed
FIT_LOG = "fit.log"
STOPPED = 75  # exit status of a pipeline fit process stopped by a preemption signal (checkpoint saved)
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

    def needs(self) -> set[str]:
        """The earlier stages this one reads: a fit's ``data`` and ``teacher``, an eval's ``ref`` and row models."""
        names = {self.spec[key] for key in ("data", "teacher", "ref") if self.spec.get(key)}
        return names | {row["model"] for row in self.spec.get("rows", [])}


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


def cpu_count() -> int:
    """CPU cores this process may use (a SLURM or taskset allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fit_width(pipeline: Pipeline) -> int:
    """The most fit stages that can run at once: stages grouped by depth (a stage is one deeper than the deepest
    stage it needs); the largest group of fit stages."""
    depth: dict[str, int] = {}
    for stage in pipeline.stages:
        depth[stage.name] = 1 + max((depth[name] for name in stage.needs()), default=0)
    counts: dict[int, int] = {}
    for stage in pipeline.stages:
        if stage.kind == "fit":
            counts[depth[stage.name]] = counts.get(depth[stage.name], 0) + 1
    return max(counts.values(), default=1)


def auto_jobs(pipeline: Pipeline) -> int:
    """``lit-gen quickstart``'s default ``--jobs``: every fit stage that can run at once, up to two per core. Three
    single-thread students on two cores finish together, where two at a time leave a core idle for the third."""
    return max(1, min(fit_width(pipeline), 2 * cpu_count()))


class Runner:
    """Runs a ``Pipeline`` into ``out``; ``tiny`` uses each stage's ``tiny`` settings (a few minutes in all);
    ``jobs`` > 1 runs independent fit stages at once, each in its own process."""

    def __init__(
        self, pipeline: Pipeline, out: str | Path, tiny: bool = False, log: Any = print, jobs: int = 1
    ) -> None:
        if jobs < 1:
            raise LitGenError(f"--jobs must be at least 1 (got {jobs})")
        self.pipeline, self.out, self.tiny, self.log, self.jobs = pipeline, Path(out), tiny, log, jobs
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

    def settings(self, name: str) -> str:
        """A fingerprint of what stage ``name`` computes: its recipe entry, ``--tiny``, and (recursively) the
        settings of the stages it reads. Recorded in ``.done``; a change means the stage's outputs are stale."""
        stage = next(s for s in self.pipeline.stages if s.name == name)
        upstream = {need: self.settings(need) for need in sorted(stage.needs())}
        recipe = None
        if stage.kind == "fit":  # the recipe's parsed content (its comments may change freely)
            try:
                recipe = yaml.safe_load(self.pipeline.resolve(stage.spec["recipe"]).read_text())
            except (LitGenError, yaml.YAMLError):  # reported when the stage runs
                recipe = stage.spec["recipe"]
        record = {"kind": stage.kind, "spec": stage.spec, "recipe": recipe, "tiny": self.tiny, "needs": upstream}
        text = json.dumps(record, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _recorded(self, name: str) -> str | None:
        """The settings ``.done`` recorded (None: not done, or a ``.done`` written before settings were recorded)."""
        try:
            record = json.loads((self.stage_dir(name) / DONE).read_text())
        except (OSError, ValueError):
            return None
        return record.get("settings") if isinstance(record, dict) else None

    def stale(self, name: str) -> bool:
        """Finished, but with other settings than the recipe's now (a ``.done`` without settings is trusted)."""
        recorded = self._recorded(name)
        return recorded is not None and recorded != self.settings(name)

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / DONE).exists() and not self.stale(name)

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self._start, self._total = time.time(), len(self.pipeline.stages)
        if self.jobs > 1:
            self._run_parallel()
        else:
            for i, stage in enumerate(self.pipeline.stages, start=1):
                if not self._skip(i, stage):
                    self._run_here(i, stage)
        self.write_report()
        return self.out / "results.md"

    def _skip(self, i: int, stage: Stage) -> bool:
        if self.done(stage.name):
            self.log(f"[{i}/{self._total}] {stage.name}: done earlier, skipped")
            return True
        if self.stale(stage.name):  # finished with other settings: keep its outputs aside and run it again
            old = self.stage_dir(stage.name)
            kept = self.out / PREVIOUS / f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            old.rename(kept)
            self.log(
                f"[{i}/{self._total}] {stage.name}: its settings changed since it ran: running it again (the old "
                f"outputs are in {kept})"
            )
        return False

    def _finished(self, i: int, stage: Stage, t0: float, summary: str | None) -> None:
        done = self.stage_dir(stage.name) / DONE
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(
            json.dumps({"seconds": round(time.time() - t0, 1), "settings": self.settings(stage.name)}) + "\n"
        )
        self.log(
            f"[{i}/{self._total}] {stage.name}: finished in {time.time() - t0:.0f}s "
            f"(total {time.time() - self._start:.0f}s)" + (f"; {summary}" if summary else "")
        )

    def _run_here(self, i: int, stage: Stage) -> None:
        """One stage in this process."""
        self.log(f"[{i}/{self._total}] {stage.name}: {stage.kind} ...")
        t0 = time.time()
        self._finished(i, stage, t0, getattr(self, f"_{stage.kind}")(stage))

    # ------------------------------------------------------------------------------------------- parallel stages
    def _run_parallel(self) -> None:
        """Fit stages as processes, up to ``jobs`` at once, each started when the stages it needs are done; shards
        and eval stages run here once theirs are (while they run they hold one of the ``jobs`` slots)."""
        running: dict[str, tuple[subprocess.Popen, int, Stage, float]] = {}
        failures: list[str] = []
        stopped: list[str] = []

        def forward(signum: int, frame: Any) -> None:
            stopped.append(signal.Signals(signum).name)
            for proc, *_ in running.values():
                proc.send_signal(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be installed from there
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        stages = self.pipeline.stages
        try:
            for i, stage in enumerate(stages, start=1):
                if self._skip(i, stage):
                    continue
                while not failures and not stopped and (len(running) >= self.jobs or stage.needs() & set(running)):
                    self._reap(running, failures, stopped)
                if failures or stopped:
                    break
                if stage.kind != "fit":
                    self._run_here(i, stage)
                    continue
                ready = 1 + sum(
                    later.kind == "fit" and not self.done(later.name) and all(map(self.done, later.needs()))
                    for later in stages[i:]
                )
                width = len(running) + min(self.jobs - len(running), ready)
                running[stage.name] = (self._launch(i, stage, max(1, cpu_count() // width)), i, stage, time.time())
            while running:
                self._reap(running, failures, stopped)
        except KeyboardInterrupt:
            for proc, *_ in running.values():  # Ctrl-C reached them too: let them save and exit
                proc.wait()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped:
            from callbacks.preemption import _requeue_slurm

            requeued = _requeue_slurm()
            raise LitGenError(
                f"pipeline stopped by {stopped[0]}: the running stages saved their checkpoints; "
                + ("job requeued" if requeued else "run the pipeline again to resume them")
            )
        if failures:
            raise LitGenError(failures[0] + (f" (and {len(failures) - 1} more failed stages)" if failures[1:] else ""))

    def _launch(self, i: int, stage: Stage, threads: int) -> subprocess.Popen:
        env = dict(os.environ, LIT_GEN_REQUEUE="0")
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        folder = self.stage_dir(stage.name)
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / FIT_LOG
        threads = env["OMP_NUM_THREADS"]
        self.log(f"[{i}/{self._total}] {stage.name}: fit ... ({threads} thread{'s' * (threads != '1')}; log {log})")
        with log.open("a") as handle:  # the child keeps its own descriptor
            return subprocess.Popen(
                self.fit_command(stage),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _reap(self, running: dict, failures: list[str], stopped: list[str]) -> None:
        """Wait (up to a second) for one running fit to end and account for it."""
        for name, (proc, i, stage, t0) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[name]
            log = self.stage_dir(name) / FIT_LOG
            if code == 0 and self.last_checkpoint(name).exists():
                self._finished(i, stage, t0, self.fit_summary(name))
            elif code == STOPPED:
                self.log(f"[{i}/{self._total}] {name}: stopped, checkpoint saved; {_last_line(log)}")
                stopped.append(stopped[0] if stopped else "a preemption signal")
            else:
                failures.append(f"stage {name} failed (exit status {code}): {_last_line(log)} (full log: {log})")
                self.log(f"[{i}/{self._total}] {failures[-1]}")
            return
        time.sleep(1.0)

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

    def fit_command(self, stage: Stage) -> list[str]:
        """The process a fit stage runs as when ``jobs`` > 1."""
        return [sys.executable, "-m", "lit_gen.pipeline", *self.fit_args(stage)]

    def fit_args(self, stage: Stage) -> list[str]:
        """The ``lit-gen fit`` command line of a fit stage (without the program name)."""
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
        if self.jobs > 1 and "trainer.enable_progress_bar" not in overrides:
            overrides["trainer.enable_progress_bar"] = False  # its log is a file: the bar would only fill it
        args += _args(overrides)
        return args + ["--ckpt_path", "last"]  # an unfinished stage resumes; a fresh one starts from scratch

    def _fit(self, stage: Stage) -> str:
        from callbacks.preemption import LAST_STOP
        from lit_gen.cli import main

        LAST_STOP.clear()
        main(self.fit_args(stage))
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


def _last_line(log: Path) -> str:
    """The last non-empty line of a fit log (for a failed stage: ``lit-gen: error: ...``)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def _fit_process(argv: list[str]) -> None:
    """``python -m lit_gen.pipeline fit ...``: one pipeline fit stage as a process (``Runner(jobs > 1)``); exits with
    ``STOPPED`` when a preemption signal ended the fit early, so the runner does not count the stage as done."""
    from callbacks.preemption import LAST_STOP
    from lit_gen.cli import main

    main(argv)
    if LAST_STOP:
        sys.exit(STOPPED)


if __name__ == "__main__":
    _fit_process(sys.argv[1:])
