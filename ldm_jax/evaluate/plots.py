"""Line plots as PNG files: a metric against one setting, a line per group.

Drawn with matplotlib's object-oriented API on the headless Agg canvas: a ``Figure`` made
here belongs to no pyplot state, so a sweep run from a notebook or a desktop session neither
switches the user's backend nor opens a window, and the figure is freed with its last
reference.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm_jax import storage

# 720 x 420 pixels: wide enough for a legend of several groups beside the axes.
FIGURE_INCHES = (7.2, 4.2)
DOTS_PER_INCH = 100


def line_figure(
    lines: Mapping[str, Sequence[tuple[object, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> Figure:
    """Draws one line with markers per entry of ``lines``: ``{legend: [(x, y), ...]}``.

    Points whose y is not finite are left out. The x values are placed evenly in their
    sorted order and labelled with their values: step counts such as 10, 25, 50 read best
    that way, and settings that mix numbers and names (checkpoint 500 or "latest") have an
    order at all. Matplotlib's own axes would space numbers by value and refuse the mix.
    A legend names the lines when there are several.
    """
    xs = sorted({x for points in lines.values() for x, _ in points}, key=_sort_key)
    position = {x: index for index, x in enumerate(xs)}
    figure = Figure(figsize=FIGURE_INCHES, dpi=DOTS_PER_INCH, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for legend, points in lines.items():
        finite = sorted((position[x], y) for x, y in points if math.isfinite(y))
        axes.plot([p for p, _ in finite], [y for _, y in finite], marker="o", label=legend)
    axes.set_xticks(range(len(xs)), [_label(x) for x in xs])
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    if len(lines) > 1:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return figure


def line_plot(
    lines: Mapping[str, Sequence[tuple[object, float]]],
    path: str,
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> None:
    """Writes ``line_figure(lines, ...)`` as a PNG to ``path`` (a disk or a bucket)."""
    figure = line_figure(lines, title=title, x_label=x_label, y_label=y_label)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes(path, buffer.getvalue())


def _label(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sort_key(value: object) -> tuple[int, float, str]:
    """Numbers in numeric order before anything else in text order."""
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))
