"""Reads the shape and colour in an image of the "shapes" dataset, without learning.

Used to score generated images: a class-conditional or text-to-image model trained on
"shapes" is right when the analyzer reads back the shape and colour it was asked for.
Generated images are blurred by the autoencoder, so the shape is read from features that a
blur leaves (nearly) unchanged.

Method, on an image box-downsampled to at most ``_ANALYSIS_SIZE`` pixels:
1. Chroma (max minus min channel) separates the saturated shape from the grey background.
   The background level is the median chroma of the border pixels, the shape level the
   median chroma above the midpoint between background and the 99th percentile; each pixel's
   coverage is its chroma rescaled between the two levels. The threshold is thus relative to
   the image's own contrast, and a blurred edge crosses coverage 1/2 at the true boundary.
2. The largest 4-connected component of the pixels more than half covered is the shape; it
   gives the colour. The shape's mass, the coverage over the connected region around it
   covered more than ``_MASS_MIN_COVERAGE`` (the blurred rim, not the background noise),
   gives the shape.
3. Colour: the palette colour nearest in hue to the median pixel of the shape's core.
4. Shape, from cumulants of the mass projected on a direction. A Gaussian blur adds a
   Gaussian to every projection, which changes the variance but not the third and fourth
   cumulants. First:
   - Triangle: an upright triangle's mass sits near its base under a thin apex, so the
     skewness of its rows (counted downwards) is -0.57; the circle and the square are
     symmetric (0). Blur widens the rows' spread, which shrinks the triangle's skewness
     (to -0.45 at a blur of 1.5 pixels on a 32-pixel image, -0.36 at 2) but creates none.
   Otherwise the ratio of the fourth cumulants (negative for these flat masses) along the
   diagonals and along the axes tells:
   - Square: it projects on a diagonal as the sum of its two side projections, which halves
     the fourth cumulant: ratio 1/2.
   - Circle: the same in every direction: ratio 1.
   Leaving out the faintest rim raises a blurred square's ratio a little (0.55 at a blur of
   1.5 pixels on a 32-pixel image, at most 0.7 at 2).

An image without a saturated region reads as shape and colour "none", and so does one whose
saturated pixels are scattered in specks (noise) or cover too little of it.
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_jax.data.shapes import COLOURS, SHAPES, describe_label

NONE = "none"

_ANALYSIS_SIZE = 64
# Below this chroma contrast between shape and background, nothing is read as a shape.
_MIN_CHROMA_CONTRAST = 40.0
# A shape covering less of the image than this is taken for noise (the dataset's smallest
# shape covers ~5%).
_MIN_FOREGROUND_FRACTION = 0.02
# A shape holds at least this share of the pixels more than half covered (at least 0.4 even
# when heavily blurred and noisy); noise scatters them over specks holding under 0.1 each.
_MIN_SHAPE_SHARE = 0.25
# The shape's mass includes its blurred rim down to this coverage; lower, background noise
# would weigh in (its chroma noise reaches a few hundredths of the shape's contrast).
_MASS_MIN_COVERAGE = 0.15
# Below this skewness of the rows the mass sits low: an upright triangle (-0.57 sharp, -0.2
# for the most blurred at 2 pixels on a 32-pixel image) rather than a symmetric shape (0,
# within +-0.1 with noise or a decoder's slight asymmetry).
_TRIANGLE_MAX_SKEWNESS = -0.15
# Below this diagonal-over-axis fourth cumulant ratio the shape has corners: halfway between
# the square (1/2) and the circle (1).
_SQUARE_MAX_CUMULANT_RATIO = 0.75
# Neighbours share an edge: a diagonal touch does not join two specks of noise into a shape.
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _hue_degrees(rgb: Sequence[float]) -> float:
    red, green, blue = (channel / 255 for channel in rgb)
    return colorsys.rgb_to_hsv(red, green, blue)[0] * 360


_PALETTE_HUES = {name: _hue_degrees(rgb) for name, rgb in COLOURS.items()}


@dataclasses.dataclass(frozen=True)
class ShapeReading:
    """What the analyzer read in one image.

    Attributes:
        shape: One of ``SHAPES``, or "none" if no shape was found.
        colour: One of ``COLOURS``, or "none" if no shape was found.
        rows_skewness: Skewness of the shape's mass over rows counted downwards (0 if
            none): about -0.57 for an upright triangle, 0 for a circle or a square.
        diagonal_cumulant_ratio: Fourth cumulant of the shape's mass along the diagonals
            over that along the axes (0 if none): 1/2 for a square, 1 for a circle.
        foreground_fraction: Fraction of the image the shape covers (0 if none).
        hue_error_degrees: Hue distance from the shape's colour to the palette colour read
            (0 if none); large values mean an off-palette colour.
    """

    shape: str
    colour: str
    rows_skewness: float = 0.0
    diagonal_cumulant_ratio: float = 0.0
    foreground_fraction: float = 0.0
    hue_error_degrees: float = 0.0


_NO_SHAPE = ShapeReading(shape=NONE, colour=NONE)


def _to_analysis_resolution(image: np.ndarray) -> np.ndarray:
    """Returns the image as float32, box-downsampled if larger than ``_ANALYSIS_SIZE``."""
    height, width = image.shape[:2]
    scale = _ANALYSIS_SIZE / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return image.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Returns the largest 4-connected component of a non-empty boolean mask.

    Of equally large components, the one met first in raster order wins (``label`` numbers
    components in that order and ``argmax`` takes the first maximum), so a reading never
    depends on anything but the image.
    """
    labels, _ = ndimage.label(mask, structure=_FOUR_CONNECTED)
    sizes = np.bincount(labels.ravel())[1:]  # Label 0 is outside the mask.
    return labels == 1 + np.argmax(sizes)


def _component_holding(part: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Returns the 4-connected component of ``mask`` that holds the connected ``part``."""
    labels, _ = ndimage.label(mask, structure=_FOUR_CONNECTED)
    return labels == labels[part][0]


def _nearest_palette_colour(rgb: np.ndarray) -> tuple[str, float]:
    """Returns the palette colour nearest in hue to ``rgb`` and the hue distance in degrees."""
    hue = _hue_degrees(rgb)
    distances = {
        name: min(abs(hue - palette_hue), 360 - abs(hue - palette_hue))
        for name, palette_hue in _PALETTE_HUES.items()
    }
    name = min(distances, key=distances.get)
    return name, float(distances[name])


def _shape_cumulants(mass: np.ndarray) -> tuple[float, float]:
    """Returns the rows' skewness and the diagonal-over-axis fourth cumulant ratio of a mass.

    Args:
        mass: Non-negative (H, W) weights, not all zero.
    """
    weights = mass / mass.sum()
    rows, columns = np.indices(mass.shape, dtype=np.float64)

    # Written out: scipy.stats' moments weigh every sample alike, and these are the moments
    # of a mass over positions.
    def cumulants(position: np.ndarray) -> tuple[float, float, float]:
        centred = position - (weights * position).sum()
        variance, third, fourth_moment = ((weights * centred**power).sum() for power in (2, 3, 4))
        return variance, third, fourth_moment - 3 * variance**2

    rows_variance, rows_third, rows_fourth = cumulants(rows)
    axis_fourth = rows_fourth + cumulants(columns)[2]
    diagonal_fourth = (
        cumulants((rows + columns) / np.sqrt(2))[2] + cumulants((rows - columns) / np.sqrt(2))[2]
    )
    rows_skewness = rows_third / rows_variance**1.5 if rows_variance > 0 else 0.0
    # A mass without flat sides (positive fourth cumulant) shows no corners: it reads round.
    ratio = diagonal_fourth / axis_fourth if axis_fourth < 0 else 1.0
    return float(rows_skewness), float(ratio)


def _shape_from_cumulants(rows_skewness: float, diagonal_cumulant_ratio: float) -> str:
    if rows_skewness < _TRIANGLE_MAX_SKEWNESS:
        return "triangle"
    if diagonal_cumulant_ratio < _SQUARE_MAX_CUMULANT_RATIO:
        return "square"
    return "circle"


def analyze(image: np.ndarray) -> ShapeReading:
    """Reads the shape and colour of one image.

    Args:
        image: uint8 (H, W, 3) RGB image.

    Returns:
        The reading; shape and colour are "none" when no saturated shape is visible.

    Raises:
        ValueError: If the image is not uint8 (H, W, 3).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 (H, W, 3) RGB, got {image.dtype} of shape {image.shape}."
        )
    pixels = _to_analysis_resolution(image)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    border = np.concatenate([chroma[0], chroma[-1], chroma[1:-1, 0], chroma[1:-1, -1]])
    background_level = float(np.median(border))
    midpoint = (background_level + float(np.percentile(chroma, 99))) / 2
    if midpoint - background_level < _MIN_CHROMA_CONTRAST / 2:
        return _NO_SHAPE
    shape_level = float(np.median(chroma[chroma > midpoint]))
    coverage = (chroma - background_level) / (shape_level - background_level)

    half_covered = coverage > 0.5
    component = _largest_component(half_covered)
    if component.sum() < _MIN_SHAPE_SHARE * half_covered.sum():
        return _NO_SHAPE
    region = _component_holding(component, coverage > _MASS_MIN_COVERAGE)
    mass = np.where(region, coverage, 0.0)
    area = float(mass.sum())
    if area < _MIN_FOREGROUND_FRACTION * mass.size:
        return _NO_SHAPE
    rows_skewness, diagonal_cumulant_ratio = _shape_cumulants(mass)

    core = component & (coverage > 0.75)
    core_pixels = pixels[core] if core.any() else pixels[component]
    colour, hue_error = _nearest_palette_colour(np.median(core_pixels, axis=0))
    return ShapeReading(
        shape=_shape_from_cumulants(rows_skewness, diagonal_cumulant_ratio),
        colour=colour,
        rows_skewness=rows_skewness,
        diagonal_cumulant_ratio=diagonal_cumulant_ratio,
        foreground_fraction=area / mass.size,
        hue_error_degrees=hue_error,
    )


def analyze_batch(images: np.ndarray | Sequence[np.ndarray]) -> list[ShapeReading]:
    """Reads every image of a uint8 (N, H, W, 3) batch or a sequence of (H, W, 3) images."""
    return [analyze(image) for image in images]


def score(images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int]) -> dict[str, float]:
    """Scores images against the class labels they should show.

    Args:
        images: uint8 (N, H, W, 3) images.
        labels: The N class labels (see ``shapes.describe_label``).

    Returns:
        "colour_accuracy", "shape_accuracy" and "both_accuracy" over all images, plus
        "colour_accuracy/{colour}" and "shape_accuracy/{shape}" over the images whose label
        has that colour or shape (only for colours and shapes present in ``labels``).

    Raises:
        ValueError: If there are no images or images and labels differ in number.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"images and labels must be equally many and not empty, got {len(images)} "
            f"images and {len(labels)} labels."
        )
    readings = analyze_batch(images)
    expected = [describe_label(label) for label in labels]
    shape_right = np.array([r.shape == s for r, (s, _) in zip(readings, expected, strict=True)])
    colour_right = np.array([r.colour == c for r, (_, c) in zip(readings, expected, strict=True)])
    metrics = {
        "colour_accuracy": float(colour_right.mean()),
        "shape_accuracy": float(shape_right.mean()),
        "both_accuracy": float((colour_right & shape_right).mean()),
    }
    expected_colours = np.array([colour for _, colour in expected])
    expected_shapes = np.array([shape for shape, _ in expected])
    for colour in COLOURS:
        if (selected := expected_colours == colour).any():
            metrics[f"colour_accuracy/{colour}"] = float(colour_right[selected].mean())
    for shape in SHAPES:
        if (selected := expected_shapes == shape).any():
            metrics[f"shape_accuracy/{shape}"] = float(shape_right[selected].mean())
    return metrics
