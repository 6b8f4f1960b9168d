"""Reports: render what runs wrote (TensorBoard events, results rows, sample grids, configs) to one HTML page.

    lit-gen report RUN_OR_PIPELINE_DIR [--out report.html]

Reads, never trains (``lit_gen/report/html.py``; the event reader is ``lit_gen/report/events.py``).
"""

from lit_gen.report.events import last_values, read_scalars
from lit_gen.report.html import render, write_report

__all__ = ["last_values", "read_scalars", "render", "write_report"]
