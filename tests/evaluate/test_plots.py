"""Sweep plots: what a reader sees in the figure, the PNG on disk, and a user's matplotlib
state left alone."""

import math
import subprocess
import sys

import numpy as np
from conftest import ROOT
from PIL import Image

from ldm_jax.evaluate.plots import line_figure, line_plot


def _texts(labels):
    return [label.get_text() for label in labels]


def test_figure_has_spaced_title_labelled_axes_and_a_marked_line_per_group():
    lines = {
        "sampler=ddim": [(50, 0.9), (10, 0.5), (25, math.nan)],
        "sampler=dpmpp_2m": [(10, 0.7), (25, 0.8), (50, 0.95)],
    }
    figure = line_figure(
        lines, title="shape_accuracy against steps", x_label="steps", y_label="shape_accuracy"
    )
    (axes,) = figure.axes
    assert axes.get_title() == "shape_accuracy against steps"
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("steps", "shape_accuracy")
    # Steps sit evenly in numeric order, labelled with their values.
    assert _texts(axes.get_xticklabels()) == ["10", "25", "50"]
    assert _texts(axes.get_legend().get_texts()) == list(lines)
    ddim, dpmpp = axes.get_lines()
    # The point without a value is left out; the others are joined in x order.
    np.testing.assert_array_equal(ddim.get_xdata(), [0, 2])
    np.testing.assert_array_equal(ddim.get_ydata(), [0.5, 0.9])
    np.testing.assert_array_equal(dpmpp.get_ydata(), [0.7, 0.8, 0.95])
    assert ddim.get_marker() == dpmpp.get_marker() == "o"
    assert ddim.get_color() != dpmpp.get_color()


def test_one_group_needs_no_legend_and_mixed_settings_are_ordered():
    figure = line_figure(
        {"fid": [("latest", 3.0), (500, 5.0), (2.5, 7.0)]},
        title="fid against checkpoint",
        x_label="checkpoint",
        y_label="fid",
    )
    (axes,) = figure.axes
    assert axes.get_legend() is None
    assert _texts(axes.get_xticklabels()) == ["2.5", "500", "latest"]
    np.testing.assert_array_equal(axes.get_lines()[0].get_ydata(), [7.0, 5.0, 3.0])


def test_writes_a_png_into_a_new_folder(tmp_path):
    path = tmp_path / "plots" / "plot-fid.png"
    line_plot(
        {"fid": [(10, 20.0), (25, 12.0)]},
        str(path),
        title="fid against steps",
        x_label="steps",
        y_label="fid",
    )
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        assert image.size == (720, 420)
        assert np.asarray(image.convert("L")).std() > 0


def test_plotting_leaves_pyplot_and_the_users_backend_alone(tmp_path):
    script = (
        "import sys; from ldm_jax.evaluate.plots import line_plot; "
        f"line_plot({{'a': [(1, 1.0), (2, 2.0)]}}, {str(tmp_path / 'p.png')!r}, "
        "title='t', x_label='x', y_label='y'); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    assert (tmp_path / "p.png").is_file()
