"""Reads the shape and colour in an image of the "shapes" dataset, without learning.

Used to score generated images: a class-conditional or text-to-image model trained on
"shapes" is right when the analyzer reads back the shape and colour it was asked for.

Method, on an image box-downsampled to at most ``_ANALYSIS_SIZE`` pixels:
1. Chroma (max minus min channel) separates the saturated shape from the grey background.
   The background level is the median chroma of the border pixels, the shape level the
   median chroma above the midpoint between background and the 99th percentile; each pixel's
   coverage is its chroma rescaled between the two levels.
2. The largest 4-connected component of the pixels more than half covered is the shape. Its
   interior counts as fully covered and its rim (the anti-aliased edge) fractionally, so
   noise in a generated image disturbs only the edge.
3. Colour: the palette colour nearest in hue to the median pixel of the shape's core.
4. Shape: the fill ratio, the covered area over the area of the extent, where width and
   height sum each column's and row's peak coverage (exact for anti-aliased edges): a
   square fills ~1, a circle ~pi/4 and a triangle ~1/2 of it.

An image with no saturated region reads as shape and colour "none".
"""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ldm_jax.data.shapes import COLOURS, SHAPES, describe_label

NONE = "none"

_ANALYSIS_SIZE = 64
# Below this chroma contrast between shape and background, nothing is read as a shape.
_MIN_CHROMA_CONTRAST = 40.0
# A shape covering less of the image than this is taken for noise (the dataset's smallest
# shape covers ~5%).
_MIN_FOREGROUND_FRACTION = 0.02
# Fill ratios between the ideal square (1), circle (pi/4 ~ 0.785) and triangle (1/2).
_SQUARE_MIN_FILL = 0.89
_CIRCLE_MIN_FILL = 0.64


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
        fill_ratio: Covered area over the area of the shape's extent (0 if none).
        foreground_fraction: Fraction of the image the shape covers (0 if none).
        hue_error_degrees: Hue distance from the shape's colour to the palette colour read
            (0 if none); large values mean an off-palette colour.
    """

    shape: str
    colour: str
    fill_ratio: float = 0.0
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
    """Returns the largest 4-connected component of a boolean mask."""
    height, width = mask.shape
    unlabelled = height * width
    labels = np.where(mask, np.arange(unlabelled).reshape(height, width), unlabelled)
    # Every pixel takes the smallest label among itself and its neighbours, then the label of
    # the pixel its label points to (pointer jumping), until stable: each component ends up
    # labelled by its smallest pixel index.
    while True:
        padded = np.pad(labels, 1, constant_values=unlabelled)
        smallest = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        smallest = np.where(mask, smallest, unlabelled)
        smallest = np.append(smallest.ravel(), unlabelled)[smallest]
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    component_labels, sizes = np.unique(labels[mask], return_counts=True)
    return labels == component_labels[np.argmax(sizes)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grows a boolean mask by one pixel in the four directions."""
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _nearest_palette_colour(rgb: np.ndarray) -> tuple[str, float]:
    """Returns the palette colour nearest in hue to ``rgb`` and the hue distance in degrees."""
    hue = _hue_degrees(rgb)
    distances = {
        name: min(abs(hue - palette_hue), 360 - abs(hue - palette_hue))
        for name, palette_hue in _PALETTE_HUES.items()
    }
    name = min(distances, key=distances.get)
    return name, float(distances[name])


def _shape_from_fill_ratio(fill_ratio: float) -> str:
    if fill_ratio >= _SQUARE_MIN_FILL:
        return "square"
    if fill_ratio >= _CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


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
    coverage = np.clip((chroma - background_level) / (shape_level - background_level), 0, 1)

    component = _largest_component(coverage > 0.5)
    # The anti-aliased rim extends one pixel beyond the half-covered pixels.
    interior = ~_dilate(~component)
    coverage = np.where(interior, 1.0, np.where(_dilate(component), coverage, 0.0))
    area = float(coverage.sum())
    if area < _MIN_FOREGROUND_FRACTION * coverage.size:
        return _NO_SHAPE
    width = float(coverage.max(axis=0).sum())
    height = float(coverage.max(axis=1).sum())
    fill_ratio = area / (width * height)

    core = component & (coverage > 0.75)
    core_pixels = pixels[core] if core.any() else pixels[component]
    colour, hue_error = _nearest_palette_colour(np.median(core_pixels, axis=0))
    return ShapeReading(
        shape=_shape_from_fill_ratio(fill_ratio),
        colour=colour,
        fill_ratio=fill_ratio,
        foreground_fraction=area / coverage.size,
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
