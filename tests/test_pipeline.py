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
