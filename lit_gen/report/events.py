"""TensorBoard event files -> scalar curves, read with tensorboard's own ``EventAccumulator``."""

from __future__ import annotations

from pathlib import Path

# Bookkeeping scalars that are not training curves (Lightning's epoch counter, ThroughputMonitor's running totals).
SKIP_TAGS = {"epoch", "hp_metric", "train/time", "train/batches", "train/samples", "train/lengths"}


def event_dirs(run: str | Path) -> list[Path]:
    """Folders under ``run`` holding TensorBoard event files (a run's ``tb/``), sorted."""
    run = Path(run)
    return sorted({p.parent for p in run.rglob("events.out.tfevents.*")})


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run's event files as (step, value) pairs sorted by step (all points kept; a resumed
    run's files are merged, a later write of the same step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for folder in event_dirs(run):
        accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get(SCALARS, []):
            points = curves.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[int(event.step)] = float(event.value)
    return {tag: sorted(points.items()) for tag, points in sorted(curves.items())}


def last_values(run: str | Path, prefix: str = "train/loss") -> dict[str, float]:
    """The last logged value of every scalar tag that starts with ``prefix`` (a stage summary's final losses)."""
    return {tag: points[-1][1] for tag, points in read_scalars(run).items() if tag.startswith(prefix) and points}
