"""Inpainting masks: random ones for training, and the canvas of outpainting.

A mask is uint8 (H, W, 1), 1 where the image is regenerated and 0 where it is kept.

Training masks follow the LDM and Stable Diffusion inpainting models: random rectangles or
thick random strokes (LaMa's "wide" masks), and a fraction of fully masked images, on which
the model learns plain text-to-image too.
"""

from __future__ import annotations

import grain
import numpy as np

from ldm_jax.data.transforms import Record

# Stable Diffusion's inpainting model masks everything in 25% of its training examples.
FULL_MASK_PROBABILITY = 0.25
# Sizes as fractions of the image side.
_BOX_SIDE_RANGE = (0.1, 0.7)
_STROKE_WIDTH_RANGE = (0.06, 0.2)
_STROKE_STEP_RANGE = (0.1, 0.4)
_MAX_BOXES = 3
_MAX_STROKES = 3
_MAX_STROKE_VERTICES = 5


def _boxes(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, _MAX_BOXES + 1))):
        height, width = (rng.uniform(*_BOX_SIDE_RANGE, size=2) * size).astype(int) + 1
        top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
        mask[top : top + height, left : left + width] = True
    return mask


def _strokes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Polylines of random direction and length, painted with a round brush."""
    rows, columns = np.indices((size, size), dtype=np.float32) + 0.5
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, _MAX_STROKES + 1))):
        radius = rng.uniform(*_STROKE_WIDTH_RANGE) * size / 2
        start = rng.uniform(0, size, size=2)
        for _ in range(int(rng.integers(1, _MAX_STROKE_VERTICES + 1))):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(*_STROKE_STEP_RANGE) * size
            end = np.clip(start + length * np.array([np.sin(angle), np.cos(angle)]), 0, size)
            # Distance of every pixel centre to the segment start-end.
            direction = end - start
            along = ((rows - start[0]) * direction[0] + (columns - start[1]) * direction[1]) / max(
                float(direction @ direction), 1e-6
            )
            along = np.clip(along, 0.0, 1.0)
            distance_squared = (rows - start[0] - along * direction[0]) ** 2 + (
                columns - start[1] - along * direction[1]
            ) ** 2
            mask |= distance_squared <= radius**2
            start = end
    return mask


def random_mask(
    rng: np.random.Generator, size: int, full_mask_probability: float = FULL_MASK_PROBABILITY
) -> np.ndarray:
    """A random training mask: everything, rectangles or strokes.

    Args:
        rng: The generator all choices are drawn from.
        size: Height and width in pixels.
        full_mask_probability: Probability of masking the whole image.

    Returns:
        uint8 (size, size, 1) in {0, 1}, never all zeros.
    """
    if rng.random() < full_mask_probability:
        return np.ones((size, size, 1), np.uint8)
    mask = _boxes(rng, size) if rng.random() < 0.5 else _strokes(rng, size)
    return mask.astype(np.uint8)[:, :, None]


class AddInpaintingMask(grain.transforms.RandomMap):
    """Adds "mask", a ``random_mask`` of the image's size, to a record."""

    def __init__(self, full_mask_probability: float = FULL_MASK_PROBABILITY):
        self.full_mask_probability = full_mask_probability

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        size = element["image"].shape[0]
        return {**element, "mask": random_mask(rng, size, self.full_mask_probability)}


def outpaint_canvas(
    image: np.ndarray, left: int, right: int, top: int, bottom: int
) -> tuple[np.ndarray, np.ndarray]:
    """The image extended by the given pixels on each side, and the mask of the extension.

    The extension repeats the image's edge pixels, so the latents along the border start
    from the image's own colours; it is regenerated all the same.

    Args:
        image: uint8 (H, W, 3).
        left, right, top, bottom: Pixels to add on each side, >= 0.

    Returns:
        (canvas uint8 (H + top + bottom, W + left + right, 3), mask uint8 (..., 1)).
    """
    pads = ((top, bottom), (left, right))
    canvas = np.pad(image, (*pads, (0, 0)), mode="edge")
    mask = np.pad(np.zeros(image.shape[:2], np.uint8), pads, constant_values=1)
    return canvas, mask[:, :, None]
