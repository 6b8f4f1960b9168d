"""`lit-gen report`: one self-contained HTML page (table, labelled grids, TensorBoard curves, configs), checked as
parsed HTML and in a real headless Chromium (no console errors, every image loads, a screenshot with content)."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_gen.errors import LitGenError
from lit_gen.report import read_scalars, write_report
from lit_gen.report.html import parse_results
from tests.conftest import run_cli

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []  # each <img> with its <figure>'s data-* attributes
        self.body: dict[str, str] = {}
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self._figure: dict[str, str] = {}
        self._cell: list[str] | None = None
        self._in_table = False
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self._figure = a
        elif tag == "img":
            self.images.append({**self._figure, **a})
        elif tag == "body":
            self.body = a
        elif tag == "table" and a.get("id") == "metrics":
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self._cell = []
        if tag in ("link", "script", "img") and any(a.get(k, "").startswith("http") for k in ("src", "href")):
            self.external.append(str(a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = {}
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._in_table = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.headers, page.rows = (page.rows[0], page.rows[1:]) if page.rows else ([], [])
    return page


def decode_png(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def browser_check(page: Path, tmp: Path) -> np.ndarray:
    """Load ``page`` in headless Chromium: no console message, every image loaded (the page's own load check), and a
    screenshot with content; returns the screenshot."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it if it can)")
    n_images = len(parse_page(page).images)
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-dom'}", "--enable-logging=stderr", "--v=0"]
        + ["--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    loaded = Page()
    loaded.feed(dom.stdout)
    assert loaded.body.get("data-images") == str(n_images), loaded.body
    assert loaded.body.get("data-images-loaded") == str(n_images), loaded.body
    shot = tmp / "screenshot.png"
    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-shot'}", "--hide-scrollbars"]
        + ["--window-size=1280,1800", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 5 and len(np.unique(pixels)) > 16  # text, tables and plots, not a blank page
    return pixels


def check_report(path: Path, source: Path, runs: list[str]) -> Page:
    """The page of ``source`` holds its metrics table (every row of results.md), every grid it names and every
    curve group of each run in ``runs``, each as a decodable, non-blank embedded PNG; nothing is loaded from outside."""
    page = parse_page(path)
    assert not page.external
    if (source / "results.md").is_file():
        header, rows, _ = parse_results((source / "results.md").read_text())
        assert page.headers == header and page.rows == rows and rows
    for image in page.images:
        pixels = decode_png(image["src"])
        assert pixels.std() > 1, image.get("alt")
        assert image.get("alt")  # labelled
    grids = {i["data-grid"] for i in page.images if "data-grid" in i}
    assert {p.name for p in source.glob("*step.png")} <= grids
    for run in runs:
        curves = [i for i in page.images if i.get("data-run") == run]
        assert curves, run
        names = {c for i in curves for c in i["data-curves"].split(",")}
        expected = {t for t in read_scalars(source / run if (source / run).is_dir() else source) if "loss" in t}
        assert expected and expected <= names, (run, expected - names)
    return page


def test_results_table_is_parsed_whatever_its_columns() -> None:
    text = "# x\n\nMode: full.\n\n| model | steps | NFE | fd | c2st |\n|---|---|---|---|---|\n"
    text += "| real train split | | | 0.5 | 0.51 |\n| teacher | 18 | 35 | 3.1 | 0.6 |\n"
    header, rows, prose = parse_results(text)
    assert header == ["model", "steps", "NFE", "fd", "c2st"] and prose == "Mode: full."
    assert rows == [["real train split", "", "", "0.5", "0.51"], ["teacher", "18", "35", "3.1", "0.6"]]


def test_report_of_written_events_grids_and_config(tmp_path: Path) -> None:
    """A run folder as lit-gen fit leaves it (events under tb/, samples/, tb/config.yaml) and a pipeline folder above
    it (results.md, <model>_<steps>step.png): every part is on the page, labelled."""
    from torch.utils.tensorboard import SummaryWriter

    from lit_gen.viz import points_picture, save_png

    root = tmp_path / "pipe"
    run = root / "student"
    writer = SummaryWriter(str(run / "tb"))
    for step in range(0, 100, 10):
        writer.add_scalar("train/loss_fake", 1.0 / (step + 1), step)
        writer.add_scalar("train/disc_accuracy", 0.5 + step / 400, step)
        writer.add_scalar("lr-AdamW", 1e-3, step)
        writer.add_scalar("epoch", 0, step)  # bookkeeping: not drawn
    writer.close()
    (run / "tb" / "config.yaml").write_text("model:\n  class_path: lit_gen.methods.fdistill.FDistill\n")
    picture = points_picture(np.random.default_rng(0).normal(size=(500, 2)))
    save_png(picture, run / "samples" / "step_0000100.png")
    save_png(picture, root / "student_1step.png")
    table = "| model | method | sampler | steps | NFE | n | fd |\n|---|---|---|---|---|---|---|\n"
    (root / "results.md").write_text(f"# p\n\nMode: full.\n\n{table}| student | fdistill | euler | 1 | 1 | 9 | 2.5 |\n")
    (run / "health.txt").write_text("step 60: the discriminator is at chance\n")
    path = write_report(root)
    assert path == root / "report.html"
    page = check_report(path, root, ["student"])
    captions = {i["alt"] for i in page.images}
    assert "student, 1 step (1 NFE)" in captions and "student, during training at step 100" in captions
    groups = {i["data-curves"] for i in page.images if "data-curves" in i}
    assert groups == {"train/loss_fake", "lr-AdamW", "train/disc_accuracy"}  # losses, learning rate, health
    text = path.read_text()
    assert "lit_gen.methods.fdistill.FDistill" in text and "the discriminator is at chance" in text


@pytest.mark.slow
def test_report_of_a_toy_run_in_a_browser(toy_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_cli(
        "fit", "-c", "recipes/toy2d/teacher.yaml", "--data.init_args.shards", toy_shards,
        "--trainer.default_root_dir", root, "--trainer.max_steps", 12, "--trainer.log_every_n_steps", 2,
        "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    path = write_report(root, tmp_path / "page" / "report.html")
    page = check_report(path, root, [root.name])
    groups = {i["data-curves"] for i in page.images}
    assert any("lr-AdamW" in g for g in groups) and any("train/loss" in g for g in groups)
    assert "resolved config of run" in path.read_text() and "TeacherDiffusion" in path.read_text()
    browser_check(path, tmp_path)


def test_report_refuses_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("report", tmp_path / "missing")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-gen: error: ") and "is not a folder" in err and len(err.splitlines()) == 1
    with pytest.raises(LitGenError, match="nothing to report"):
        write_report(tmp_path)
    with pytest.raises(LitGenError, match="not a folder"):
        write_report(tmp_path / "missing")
