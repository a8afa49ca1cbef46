"""A sweep's results on disk: ``results.json``, ``results.csv``, the plots and the summary.

Every row is one point: ``{"settings": {...}, "metrics": {...}}`` in the JSON, one flat
line in the CSV. The settings are everything a point's numbers depend on (the resolved
sampling options, checkpoint step, seed, prompts and samples per prompt), so a row whose
settings equal a point's is that point done, and a re-run skips it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence

from ldm_jax import storage
from ldm_jax.evaluate.plots import line_plot

RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
# The headline metrics: plotted and printed in the summary (per-colour accuracies etc.
# are in the files only).
SUMMARY_METRICS = (
    "fid",
    "kid",
    "clip_score",
    "colour_accuracy",
    "shape_accuracy",
    "both_accuracy",
    "psnr",
    "ssim",
    "lpips",
    "rfid",
)
PLOT_X_KEYS = ("steps", "guidance", "checkpoint", "eta", "guidance_rescale", "seed", "sampler")

Row = dict[str, dict]


def settings_key(settings: dict) -> str:
    """A canonical text of a point's settings, to compare a point with a finished row."""
    return json.dumps(settings, sort_keys=True)


def read_rows(out_dir: str) -> list[Row]:
    """The rows of an earlier run of the sweep (none when it has not run)."""
    path = storage.as_path(out_dir) / RESULTS_JSON
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def write_rows(out_dir: str, rows: Sequence[Row], spec: str) -> None:
    """Writes ``results.json`` and ``results.csv`` (atomically: a stopped sweep keeps the
    points it finished)."""
    storage.write_text(
        storage.join(out_dir, RESULTS_JSON),
        json.dumps({"sweep": spec, "rows": list(rows)}, indent=2, sort_keys=True),
    )
    setting_names = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    metric_names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(setting_names + metric_names)
    for row in rows:
        writer.writerow(
            [row["settings"].get(k, "") for k in setting_names]
            + [row["metrics"].get(k, "") for k in metric_names]
        )
    storage.write_text(storage.join(out_dir, RESULTS_CSV), table.getvalue())


def _headline(rows: Sequence[Row]) -> list[str]:
    present = {k for r in rows for k, v in r["metrics"].items() if v is not None}
    return [m for m in SUMMARY_METRICS if m in present]


def write_plots(out_dir: str, rows: Sequence[Row], swept: Sequence[str]) -> list[str]:
    """One PNG per headline metric against the first swept key of ``PLOT_X_KEYS`` (steps
    when swept), one line per combination of the other swept keys. Returns the paths."""
    x_key = next((k for k in PLOT_X_KEYS if k in swept), None)
    if x_key is None:
        return []
    others = [k for k in swept if k != x_key]
    paths = []
    for metric in _headline(rows):
        lines: dict[str, list[tuple[object, float]]] = {}
        for row in rows:
            legend = " ".join(f"{k}={row['settings'][k]}" for k in others) or metric
            value = row["metrics"].get(metric)
            y = float(value) if value is not None else math.nan
            lines.setdefault(legend, []).append((row["settings"][x_key], y))
        path = storage.join(out_dir, f"plot-{metric}.png")
        line_plot(lines, path, title=f"{metric} against {x_key}", x_label=x_key, y_label=metric)
        paths.append(path)
    return paths


def summary_table(rows: Sequence[Row], swept: Sequence[str]) -> str:
    """A fixed-width table: the swept settings and the headline metrics of every row."""
    metrics = _headline(rows)
    header = [*swept, *metrics]
    lines = [
        [str(row["settings"][k]) for k in swept] + [_format(row["metrics"].get(m)) for m in metrics]
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))

    rule = render(["-" * w for w in widths])
    return "\n".join([render(header), rule] + [render(r) for r in lines])


def _format(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
