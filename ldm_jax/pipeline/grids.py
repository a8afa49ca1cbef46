"""Image grids as PNG files, and what the preview grids of a model show.

The preview grid (written during stage-2 training, and what ``evaluate --sweep`` samples by
default) covers the model's conditions: every colour x shape prompt of the shapes dataset,
one sample of every class of a class-conditional model (evenly spaced classes when there are
more than ``MAX_PREVIEW_CLASSES``), else the captions of the first validation records, whose
low-resolution images are the inputs of a super-resolution model.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from ldm_jax import storage
from ldm_jax.config import num_classes
from ldm_jax.data import degradation, shapes
from ldm_jax.pipeline.datasets import validation_records

NUM_VALIDATION_PREVIEWS = 16
MAX_PREVIEW_CLASSES = 64


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles uint8 images (N, H, W, 3) into one (rows*H, columns*W, 3) image with white gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full(
        (rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 255, np.uint8
    )
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_grid(images: np.ndarray, path: str, columns: int | None = None) -> np.ndarray:
    """Writes ``make_grid(images)`` as a PNG (on a disk or in a bucket) and returns the grid."""
    grid = make_grid(images, columns)
    storage.write_png(path, grid)
    return grid


def preview_classes(count: int) -> list[int]:
    """Every class label, or ``MAX_PREVIEW_CLASSES`` evenly spaced ones of many."""
    if count <= MAX_PREVIEW_CLASSES:
        return list(range(count))
    return [int(n) for n in np.linspace(0, count - 1, MAX_PREVIEW_CLASSES).round()]


def preview_conditions(config: ml_collections.ConfigDict) -> tuple[list[str], list[int]]:
    """Prompts and labels of the preview grid (see the module docstring), one per sample."""
    sr = config.diffusion.concat_conditioning == "sr"
    if config.data.source == "shapes" and not sr:
        prompts, labels = zip(*shapes.class_prompts(), strict=True)
        return list(prompts), list(labels)
    if config.diffusion.conditioning == "class" and not sr:
        labels = preview_classes(num_classes(config))
        return [f"class {n}" for n in labels], labels
    records = validation_records(config, NUM_VALIDATION_PREVIEWS)
    return [str(r["caption"]) for r in records], [int(r["label"]) for r in records]


def preview_images(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The grid's image inputs (``options.MODE_INPUTS``): the low-resolution validation
    images of ``preview_conditions`` for a super-resolution model, else none."""
    if config.diffusion.concat_conditioning != "sr":
        return {}
    factor = config.diffusion.super_resolution_factor
    records = validation_records(config, NUM_VALIDATION_PREVIEWS)
    return {"low_res": np.stack([degradation.downsample(r["image"], factor) for r in records])}
