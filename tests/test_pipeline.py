"""Pipeline recipes: validation errors, and a small toy2d pipeline that runs, writes results and resumes per stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_gen.errors import LitGenError
from lit_gen.pipeline import Pipeline, Runner
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    return path


def test_pipeline_recipes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(LitGenError, match="unknown pipeline keys"):
        Pipeline.read(write(tmp_path, "stages: []\nfoo: 1\n"))
    with pytest.raises(LitGenError, match="not an earlier stage"):
        Pipeline.read(write(tmp_path, "stages:\n  - {name: t, fit: {recipe: r.yaml, data: nope}}\n"))
    with pytest.raises(LitGenError, match="unknown fit keys"):
        Pipeline.read(write(tmp_path, "stages:\n  - {name: t, fit: {recipe: r.yaml, epochs: 3}}\n"))
    with pytest.raises(LitGenError, match="exactly one of"):
        Pipeline.read(write(tmp_path, "stages:\n  - {name: t}\n"))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes" / "pipelines").glob("*.yaml")))
def test_every_shipped_pipeline_reads_and_names_existing_recipes(name: str) -> None:
    shipped = Pipeline.read(REPO / "recipes" / "pipelines" / name)
    fits = [stage for stage in shipped.stages if stage.kind == "fit"]
    assert fits, name
    for stage in fits:
        assert shipped.resolve(stage.spec["recipe"]).is_file(), (name, stage.name)


def test_a_fit_stopped_by_a_signal_is_not_marked_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM makes the Preemption callback save and return from fit; the stage must stay unfinished (found when a
    killed quickstart skipped its 157-step teacher as 'done' on the next run)."""
    import callbacks.preemption
    import lit_gen.cli

    def stopped_fit(args: list[str]) -> None:
        callbacks.preemption.LAST_STOP.append("SIGTERM at step 157")

    monkeypatch.setattr(lit_gen.cli, "main", stopped_fit)
    fit_recipe = tmp_path / "recipe.yaml"
    fit_recipe.write_text("{}\n")
    recipe = write(tmp_path, f"name: p\nstages:\n  - {{name: teacher, fit: {{recipe: {fit_recipe}}}}}\n")
    with pytest.raises(LitGenError, match="stopped by SIGTERM at step 157"):
        Runner(Pipeline.read(recipe), tmp_path / "out", log=lambda *_: None).run()
    assert not (tmp_path / "out" / "teacher" / ".done").exists()


@pytest.mark.slow
def test_toy_pipeline_runs_and_resumes_per_stage(tmp_path: Path) -> None:
    recipe = write(
        tmp_path,
        """
name: toy
stages:
  - name: data
    shards: {source: "builtin:toy2d:gmm8:4000", shard_size: 2000}
  - name: teacher
    fit:
      recipe: recipes/toy2d/teacher.yaml
      data: data
      args: {trainer.max_steps: 400, model.init_args.decay_steps: 400, trainer.enable_progress_bar: false}
      tiny: {trainer.max_steps: 30, model.init_args.decay_steps: 30, model.init_args.warmup_steps: 5}
  - name: eval
    eval: {ref: data, n: 2000, tiny_n: 500, rows: [{model: teacher, steps: [1, 18]}]}
""",
    )
    out = tmp_path / "out"
    lines: list[str] = []
    Runner(Pipeline.read(recipe), out, tiny=True, log=lines.append).run()
    results = (out / "results.md").read_text()
    assert "| teacher |" in results and "mode_tv" in results
    assert (out / "teacher_1step.png").is_file() and (out / "teacher" / "checkpoints" / "last.ckpt").is_file()
    lines.clear()
    Runner(Pipeline.read(recipe), out, tiny=True, log=lines.append).run()
    assert sum("skipped" in line for line in lines) == 3


@pytest.mark.slow
def test_quickstart_tiny_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lit-gen quickstart --tiny`: shards -> teacher -> TRACT, CD, f-distill -> results.md + grids."""
    from tests.conftest import run_cli

    monkeypatch.chdir(REPO)
    out = tmp_path / "qs"
    run_cli("quickstart", "--tiny", "--out", out)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"report: {out / 'report.html'} (open it in a browser)"
    assert any("teacher: finished in" in line and "final loss" in line and "last.ckpt" in line for line in lines)
    results = (out / "results.md").read_text()
    for model in ("teacher", "tract", "cd", "fdistill_js"):
        assert f"| {model} |" in results, model
    assert "| fd " in results or "| fd |" in results
    assert "fd_ratio" in results and "FD of teacher at 35 NFE" in results
    assert {p.name for p in out.glob("*.png")} >= {"teacher_1step.png", "tract_1step.png", "fdistill_js_1step.png"}
    assert "| cd | consistency | consistency | 2 |" in results
    assert (out / "teacher" / "tb").is_dir()
    # The report: the table, every grid and every run's curves (parsed HTML), and a real browser's check.
    from tests.test_report import browser_check, check_report

    page = check_report(out / "report.html", out, ["teacher", "tract", "cd", "fdistill_js"])
    assert {i["data-grid"] for i in page.images if i.get("data-kind") == "final"} == {p.name for p in out.glob("*.png")}
    browser_check(out / "report.html", tmp_path)


def test_fd_ratio_is_relative_to_the_reference_models_most_nfe() -> None:
    from lit_gen.pipeline import add_fd_ratio

    rows = [
        {"model": "teacher", "nfe": 1, "fd": 300.0},
        {"model": "teacher", "nfe": 35, "fd": 6.0},
        {"model": "student", "nfe": 1, "fd": 9.0},
        {"model": "points", "nfe": 1, "mode_tv": 0.1},
    ]
    note = add_fd_ratio(rows, "teacher")
    assert [r.get("fd_ratio") for r in rows] == [50.0, 1.0, 1.5, None]
    assert "teacher at 35 NFE" in note
    assert add_fd_ratio([{"model": "x", "nfe": 1, "mode_tv": 0.1}], "x") == ""


# ------------------------------------------------------------------------------------------ --jobs N (parallel fits)
# A stand-in fit process: records when it ran and with how many threads, writes the stage's last.ckpt, sleeps, and
# exits with the status the test asks for (FAKE_EXIT_<stage>) — the scheduler, not Lightning, is under test here;
# `test_quickstart_tiny_end_to_end` runs real fits through `python -m lit_gen.pipeline` with the default jobs.
FAKE_FIT = """
import json, os, signal, sys, time
from pathlib import Path
folder = Path(sys.argv[sys.argv.index("--trainer.default_root_dir") + 1])
def stop(signum, frame):  # a real fit checkpoints at the next step, then exits STOPPED
    (folder / "stopped").write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
start = time.time()
code = int(os.environ.get("FAKE_EXIT_" + folder.name, "0"))
if code == 0:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "last.ckpt").write_text("x")
time.sleep(float(os.environ.get("FAKE_SLEEP", "1.5")))
print("lit-gen: error: the fake fit failed" if code else "fake fit done")
threads, requeue = os.environ["OMP_NUM_THREADS"], os.environ.get("LIT_GEN_REQUEUE")
ran = {"start": start, "end": time.time(), "threads": threads, "requeue": requeue}
(folder / "ran.json").write_text(json.dumps(ran))
sys.exit(code)
"""

PARALLEL = """
name: par
stages:
  - {name: teacher, fit: {recipe: REC}}
  - {name: a, fit: {recipe: REC, teacher: teacher}}
  - {name: b, fit: {recipe: REC, teacher: teacher}}
  - {name: c, fit: {recipe: REC, teacher: teacher}}
"""


def parallel_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int = 2) -> tuple[Runner, list[str]]:
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("lit_gen.pipeline.cpu_count", lambda: 4)
    fake = tmp_path / "fake_fit.py"
    fake.write_text(FAKE_FIT)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    monkeypatch.setattr(Runner, "fit_command", lambda self, stage: [sys.executable, str(fake), *self.fit_args(stage)])
    monkeypatch.setattr(Runner, "fit_summary", lambda self, name: "")
    lines: list[str] = []
    pipe = Pipeline.read(write(tmp_path, PARALLEL.replace("REC", str(tmp_path / "recipe.yaml"))))
    return Runner(pipe, tmp_path / "out", log=lines.append, jobs=jobs), lines


def ran(runner: Runner, name: str) -> dict:
    import json

    return json.loads((runner.stage_dir(name) / "ran.json").read_text())


def test_parallel_fits_start_after_their_teacher_and_share_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, lines = parallel_runner(tmp_path, monkeypatch, jobs=2)
    runner.run()
    teacher, a, b, c = (ran(runner, name) for name in "teacher a b c".split())
    assert all(runner.done(name) for name in "teacher a b c".split())
    assert min(a["start"], b["start"], c["start"]) >= teacher["end"]  # students wait for their teacher
    assert a["start"] < b["end"] and b["start"] < a["end"]  # a and b ran at the same time ...
    assert c["start"] >= min(a["end"], b["end"])  # ... and c waited for a free slot (jobs = 2)
    # The lone teacher gets all 4 cores, two students at once 2 each; the last one starts while one still runs.
    assert (teacher["threads"], a["threads"], b["threads"], c["threads"]) == ("4", "2", "2", "2")
    assert {a["requeue"], teacher["requeue"]} == {"0"}  # the pipeline, not each fit, requeues a SLURM job
    assert (runner.stage_dir("a") / "fit.log").read_text().strip() == "fake fit done"
    assert sum("finished in" in line for line in lines) == 4
    lines.clear()
    runner.run()  # everything done: all skipped, nothing launched
    assert sum("skipped" in line for line in lines) == 4


def test_a_failed_parallel_fit_names_its_log_and_lets_the_others_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXIT_a", "2")
    runner, lines = parallel_runner(tmp_path, monkeypatch, jobs=2)
    failed = r"stage a failed \(exit status 2\): lit-gen: error: the fake fit failed"
    with pytest.raises(LitGenError, match=failed) as e:
        runner.run()
    assert str(runner.stage_dir("a") / "fit.log") in str(e.value)
    assert runner.done("b") and not runner.done("a")  # b ran beside a and finished; its work is kept
    assert not (runner.stage_dir("c") / "ran.json").exists()  # nothing new starts after a failure


def test_a_preemption_signal_reaches_every_running_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 to the pipeline goes to its running fit; a fit that exits STOPPED (checkpoint saved) is not done,
    nothing new starts, and the pipeline's own handlers are put back."""
    import os
    import signal
    import threading

    monkeypatch.setenv("FAKE_SLEEP", "20")
    runner, lines = parallel_runner(tmp_path, monkeypatch, jobs=2)
    before = signal.getsignal(signal.SIGUSR1)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    timer.start()
    with pytest.raises(LitGenError, match="pipeline stopped by SIGUSR1.*run the pipeline again to resume"):
        runner.run()
    timer.join()
    assert (runner.stage_dir("teacher") / "stopped").read_text() == "SIGUSR1"  # forwarded to the fit
    assert not runner.done("teacher") and not runner.stage_dir("a").exists()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    recipe = write(tmp_path, "stages:\n  - {name: d, shards: {source: 'builtin:toy2d:gmm8:100'}}\n")
    with pytest.raises(LitGenError, match="--jobs must be at least 1"):
        Runner(Pipeline.read(recipe), tmp_path / "out", jobs=0)


def test_quickstart_runs_its_three_students_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_gen.pipeline import auto_jobs, fit_width

    quickstart = Pipeline.read(REPO / "recipes" / "pipelines" / "digits.yaml")
    assert fit_width(quickstart) == 3  # teacher alone, then TRACT, CD and f-distill
    for cores, jobs in ((1, 2), (2, 3), (16, 3)):
        monkeypatch.setattr("lit_gen.pipeline.cpu_count", lambda cores=cores: cores)
        assert auto_jobs(quickstart) == jobs


def test_a_finished_stage_whose_settings_changed_runs_again_and_its_old_outputs_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found when a quickstart re-run after a change to the f-distill stage's args skipped it as 'done' and reported
    the old student: `.done` records the stage's settings; a change there (or upstream) runs it, and what it reads
    from, again, keeping the old outputs under OUT/.previous/."""
    runner, lines = parallel_runner(tmp_path, monkeypatch, jobs=2)
    runner.run()
    first = {name: ran(runner, name)["start"] for name in "teacher a b c".split()}
    # A changed student entry: only that student runs again.
    stage = next(s for s in runner.pipeline.stages if s.name == "b")
    stage.spec["args"] = {"model.init_args.lr": 1e-4}
    assert runner.stale("b") and not runner.done("b") and runner.done("a")
    lines.clear()
    runner.run()
    assert ran(runner, "b")["start"] > first["b"]
    assert all(ran(runner, name)["start"] == first[name] for name in "teacher a c".split())
    assert any("b: its settings changed since it ran: running it again" in line for line in lines)
    kept = list((runner.out / ".previous").glob("b-*"))
    assert len(kept) == 1 and (kept[0] / "ran.json").is_file() and runner.done("b")
    # A changed recipe file under the teacher (not its comments) reaches every stage that reads the teacher.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# only a comment\n{}\n")
    assert all(runner.done(name) for name in "teacher a b c".split())
    recipe.write_text("trainer: {max_steps: 3}\n")
    assert all(runner.stale(name) for name in "teacher a b c".split())
    # A .done written before settings were recorded (a plain number of seconds) is trusted as done.
    (runner.stage_dir("a") / ".done").write_text("12.5\n")
    assert runner.done("a") and not runner.stale("a")


def test_pipelines_meant_to_share_a_folder_agree_on_every_stage_they_share() -> None:
    """The headroom, TRACT-ablation and seeds pipelines run into the quickstart's folder to reuse its stages; a stage
    name they share must mean the same stage, or each run would redo the other's (settings recorded in `.done`)."""
    import itertools

    names = ["digits", "digits_headroom", "digits_tract_ablation", "digits_tract_btd_seeds"]
    read = {n: Pipeline.read(REPO / "recipes" / "pipelines" / f"{n}.yaml") for n in names}
    for a, b in itertools.combinations(names, 2):
        stages_a = {s.name: s for s in read[a].stages}
        for stage in read[b].stages:
            if stage.name in stages_a:
                assert stage.spec == stages_a[stage.name].spec, (a, b, stage.name)
