"""One static, self-contained HTML page from what runs wrote: the metrics table (``results.md``), labelled sample grids,
training curves from the TensorBoard event files (matplotlib) and each stage's resolved config. Reads, never trains.
Every picture is embedded as a base64 PNG, so the page can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lit_gen.errors import LitGenError
from lit_gen.report.events import SKIP_TAGS, event_dirs, read_scalars

HEALTH_FILE = "health.txt"  # warnings written by callbacks.health.TrainingHealth, one per line (no import of it:
# the report reads files and does not import Lightning callbacks)

# Curve groups, in page order: (title, predicate on the tag). A tag goes to the first group that takes it.
GROUPS: tuple[tuple[str, object], ...] = (
    ("losses", lambda t: "loss" in t),
    ("learning rate", lambda t: t.startswith("lr-") or t.endswith("/lr")),
    ("health", lambda t: t.startswith("health/") or any(k in t for k in ("disc_acc", "ratio_", "logit_", "gap"))),
    ("EMA", lambda t: "ema" in t.lower()),
    ("throughput", lambda t: "per_sec" in t),
    ("other", lambda t: True),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} tr.floor td{font-style:italic;background:#f8f8ff}
.grids,.curves{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0 0 1em 0} figcaption{font-size:.9em;color:#444}
img{image-rendering:pixelated;max-width:100%} .curves img{image-rendering:auto}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.8em;max-height:30em} .warn{color:#a00}
"""
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images), loaded = 0;
  images.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { loaded += 1; } else { console.error("image did not load: " + img.alt); }
  });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
});
"""


@dataclass
class Run:
    """One training run folder (a pipeline's fit stage, or a ``lit-gen fit`` root dir)."""

    name: str
    root: Path
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(src: str, caption: str, **attrs: str) -> str:
    extra = "".join(f' data-{k}="{html.escape(v)}"' for k, v in attrs.items())
    cap = html.escape(caption)
    return f'<figure{extra}><img src="{src}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def parse_results(text: str) -> tuple[list[str], list[list[str]], str]:
    """The first markdown table of ``results.md``: (header, rows, the prose before it)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    if start is None:
        return [], [], text.strip()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    table = []
    for line in lines[start:]:
        if not line.lstrip().startswith("|"):
            break
        table.append(line)
    header = cells(table[0])
    rows = [cells(line) for line in table[1:] if not re.fullmatch(r"\|?[\s:|-]*", line.strip())]
    prose = "\n".join(line for line in lines[:start] if not line.startswith("# ")).strip()
    return header, rows, prose


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ['<table id="metrics"><thead><tr>', *(f"<th>{html.escape(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in rows:
        # Rows measured on real data (e.g. "real train split") are the floor a model can reach: set apart.
        cls = ' class="floor"' if row and row[0].lower().startswith("real") else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


def find_runs(source: Path) -> list[Run]:
    """``source`` itself when it holds event files directly under ``tb/``, else its sub-folders that hold event files
    (pipeline stages), in the order they finished (``.done`` time), then by name."""
    if (source / "tb").is_dir():
        return [Run(source.name, source)]
    folders = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".") and event_dirs(p)]

    def order(p: Path) -> tuple[float, str]:
        done = p / ".done"
        return (done.stat().st_mtime if done.exists() else float("inf"), p.name)

    return [Run(p.name, p) for p in sorted(folders, key=order)]


def curve_pictures(run: Run) -> list[tuple[str, list[str], bytes]]:
    """One matplotlib figure per curve group of ``run``: (group, tags, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [t for t in run.curves if t not in SKIP_TAGS and run.curves[t]]
    grouped: dict[str, list[str]] = {}
    for tag in tags:
        group = next(title for title, take in GROUPS if take(tag))  # type: ignore[operator]
        grouped.setdefault(group, []).append(tag)
    pictures = []
    for title, _ in GROUPS:
        members = grouped.get(title)
        if not members:
            continue
        cols = min(4, len(members))
        rows = -(-len(members) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, dpi=80)
        for ax, tag in zip(axes.flat, members, strict=False):
            steps, values = zip(*run.curves[tag], strict=True)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(members) :]:
            ax.axis("off")
        fig.suptitle(f"{run.name}: {title}", fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        pictures.append((title, members, buffer.getvalue()))
    return pictures


def _grid_order(name: str, header: list[str], rows: list[list[str]]) -> tuple[int, int, str]:
    """Grids in the table's model order, then by step count (``teacher_2step`` before ``teacher_18step``)."""
    match = re.fullmatch(r"(.+)_(\d+)step", name)
    models = list(dict.fromkeys(r[header.index("model")] for r in rows if "model" in header and r)) if rows else []
    if not match:
        return (len(models) + 1, 0, name)
    model = match.group(1)
    return (models.index(model) if model in models else len(models), int(match.group(2)), name)


def _grid_caption(name: str, header: list[str], rows: list[list[str]]) -> str:
    """``teacher_18step.png`` -> "teacher, 18 steps (35 NFE)" (NFE from the metrics table when it has the row)."""
    match = re.fullmatch(r"(.+)_(\d+)step", name)
    if not match:
        return name
    model, steps = match.group(1), match.group(2)
    caption = f"{model}, {steps} step{'s' if steps != '1' else ''}"
    if {"model", "steps", "NFE"} <= set(header):
        m, s, n = header.index("model"), header.index("steps"), header.index("NFE")
        nfe = next((r[n] for r in rows if len(r) == len(header) and r[m] == model and r[s] == steps), None)
        if nfe:
            caption += f" ({nfe} NFE)"
    return caption


def render(source: str | Path) -> str:
    """The report page of a run or pipeline folder."""
    source = Path(source)
    if not source.is_dir():
        raise LitGenError(f"{source} is not a folder (give a run folder or a pipeline output folder)")
    runs = find_runs(source)
    results = source / "results.md"
    header, rows, prose = parse_results(results.read_text()) if results.is_file() else ([], [], "")
    grids = sorted(source.glob("*step.png"), key=lambda p: _grid_order(p.stem, header, rows))
    if not runs and not header and not grids:
        raise LitGenError(f"nothing to report in {source}: no TensorBoard events, results.md or sample grids")
    for run in runs:
        run.curves = read_scalars(run.root)

    parts = [f"<h1>lit_gen report: {html.escape(source.name)}</h1>"]
    parts.append(f"<p>Folder <code>{html.escape(str(source.resolve()))}</code>, written ")
    parts.append(f"{time.strftime('%Y-%m-%d %H:%M', time.localtime())} by <code>lit-gen report</code>.</p>")
    if header:
        parts.append('<h2 id="metrics-table">Metrics</h2>')
        if prose:
            parts.append(f"<p>{html.escape(' '.join(prose.split()))}</p>")
        parts.append(_table(header, rows))

    sample_figures = [
        _figure(_png(p.read_bytes()), _grid_caption(p.stem, header, rows), grid=p.name, kind="final") for p in grids
    ]
    for run in runs:
        shots = sorted((run.root / "samples").glob("step_*.png"))
        if len(shots) > 4:  # first, last and two between
            shots = [shots[round(i * (len(shots) - 1) / 3)] for i in range(4)]
        for p in shots:
            step = int(p.stem.split("_")[1])
            caption = f"{run.name}, during training at step {step}"
            sample_figures.append(_figure(_png(p.read_bytes()), caption, grid=f"{run.name}/{p.name}", kind="training"))
    if sample_figures:
        parts.append('<h2 id="samples">Samples</h2><div class="grids">' + "".join(sample_figures) + "</div>")

    if runs:
        parts.append('<h2 id="curves">Training curves</h2>')
    for run in runs:
        parts.append(f'<h3 id="run-{html.escape(run.name)}">{html.escape(run.name)}</h3>')
        health = run.root / HEALTH_FILE
        if health.is_file():
            for line in health.read_text().splitlines():
                parts.append(f'<p class="warn">⚠ {html.escape(line)}</p>')
        pictures = curve_pictures(run)
        if not pictures:
            parts.append("<p>No scalars logged (a run shorter than its <code>log_every_n_steps</code>).</p>")
        parts.append('<div class="curves">')
        for title, tags, png in pictures:
            caption = f"{run.name}: {title} ({', '.join(tags)})"
            parts.append(_figure(_png(png), caption, run=run.name, curves=",".join(tags)))
        parts.append("</div>")
        config = run.root / "tb" / "config.yaml"
        if config.is_file():
            parts.append(f"<details><summary>resolved config of {html.escape(run.name)}</summary>")
            parts.append(f'<pre class="config">{html.escape(config.read_text())}</pre></details>')
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>lit_gen report: {html.escape(source.name)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n<script>{CHECK_IMAGES}</script></body></html>\n"
    )


def write_report(source: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``source`` to ``out`` (default ``source/report.html``); returns its path."""
    path = Path(out) if out is not None else Path(source) / "report.html"
    text = render(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
