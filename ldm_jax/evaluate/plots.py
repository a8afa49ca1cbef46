"""Line plots as PNG files, drawn with PIL: a metric against one setting, a line per group.

A plot needs no plotting library: axes, ticks, one polyline with markers per group and a
legend, in PIL's built-in font. The x values are placed evenly in their sorted order (step
counts such as 10, 25, 50 read best that way), labelled with their values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 220, 40, 50
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARKER_RADIUS = 3


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 2)]


def _label(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def line_plot(
    lines: Mapping[str, Sequence[tuple[object, float]]],
    path: str,
    *,
    title: str,
    x_label: str,
) -> None:
    """Writes a PNG of one polyline per entry of ``lines``: ``{legend: [(x, y), ...]}``.

    Points whose y is not finite are left out. The file's folder is created.
    """
    xs = sorted({x for points in lines.values() for x, _ in points}, key=_sort_key)
    ys = [y for points in lines.values() for _, y in points if math.isfinite(y)]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((LEFT, 12), title, fill="black", font=font)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    draw.rectangle((LEFT, TOP, LEFT + plot_w, TOP + plot_h), outline="black")
    low, high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    ticks = _ticks(low, high) if high > low else [low - 1, low, low + 1]
    y_low, y_high = ticks[0], ticks[-1]

    def to_pixel(x: object, y: float) -> tuple[float, float]:
        column = (xs.index(x) + 0.5) / len(xs)
        return LEFT + column * plot_w, TOP + plot_h * (1 - (y - y_low) / (y_high - y_low))

    for tick in ticks:
        _, y = to_pixel(xs[0], tick) if xs else (0, TOP)
        draw.line((LEFT - 4, y, LEFT, y), fill="black")
        draw.text((4, y - 6), _label(float(tick)), fill="black", font=font)
    for x in xs:
        px, _ = to_pixel(x, y_low)
        draw.line((px, TOP + plot_h, px, TOP + plot_h + 4), fill="black")
        draw.text((px - 8, TOP + plot_h + 8), _label(x), fill="black", font=font)
    draw.text((LEFT + plot_w // 2 - 20, HEIGHT - 20), x_label, fill="black", font=font)
    for index, (legend, points) in enumerate(lines.items()):
        colour = COLOURS[index % len(COLOURS)]
        finite = sorted(
            ((x, y) for x, y in points if math.isfinite(y)), key=lambda p: xs.index(p[0])
        )
        pixels = [to_pixel(x, y) for x, y in finite]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            r = MARKER_RADIUS
            draw.ellipse((px - r, py - r, px + r, py + r), fill=colour)
        legend_y = TOP + 16 * index
        draw.line((WIDTH - RIGHT + 12, legend_y + 6, WIDTH - RIGHT + 32, legend_y + 6), colour, 2)
        draw.text((WIDTH - RIGHT + 38, legend_y), legend, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def _sort_key(value: object) -> tuple[int, float, str]:
    """Numbers in numeric order before anything else in text order."""
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))
