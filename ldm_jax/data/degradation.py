"""Bicubic degradation for super-resolution: the low-resolution input of an image.

PIL's bicubic filter with antialiasing (its default), as the LDM super-resolution models are
trained with; the same resize upsamples back for the bicubic baseline.
"""

from __future__ import annotations

import grain
import numpy as np
from PIL import Image

from ldm_jax.data.transforms import Record


def bicubic_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3), bicubic with antialiasing."""
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """The image ``factor`` times smaller on each side, bicubic.

    Raises:
        ValueError: If a side is not divisible by ``factor``.
    """
    height, width = image.shape[:2]
    if height % factor or width % factor:
        raise ValueError(f"an image of {height}x{width} is not divisible by factor {factor}")
    return bicubic_resize(image, height // factor, width // factor)


class AddLowResolution(grain.transforms.Map):
    """Adds "low_res", the image downsampled ``factor`` times, to a record."""

    def __init__(self, factor: int):
        self.factor = factor

    def map(self, element: Record) -> Record:
        return {**element, "low_res": downsample(element["image"], self.factor)}
