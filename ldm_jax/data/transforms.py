"""Grain transforms over records ``{"image": uint8 (H, W, 3), "label": int32, "caption": str}``.

``Tokenize`` and ``SelectKeys`` map batches of records as well, once per batch.

Grain worker processes are spawned and receive the transforms by pickling, so every
transform is a top-level class holding only plain, picklable fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers
from PIL import Image

from ldm_jax.data import tokenizer as word_tokenizer

Record = dict[str, Any]


class ResizeAndCrop(grain.transforms.RandomMap):
    """Resizes the shorter image side to ``image_size``, then crops a square of that size.

    Resizing is bicubic with PIL's antialiasing; images smaller than the crop are upscaled.
    The crop is centred, or placed at random when ``random_crop`` is set.
    """

    def __init__(self, image_size: int, random_crop: bool):
        """Initialises the transform.

        Args:
            image_size: Height and width of the output image.
            random_crop: Crop at a random offset instead of the centre.

        Raises:
            ValueError: If ``image_size`` is not positive.
        """
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.image_size = image_size
        self.random_crop = random_crop

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        image = element["image"]
        height, width = image.shape[:2]
        scale = self.image_size / min(height, width)
        if scale != 1:
            # max() stops rounding from leaving a side one pixel short of the crop.
            size = (
                max(self.image_size, round(width * scale)),
                max(self.image_size, round(height * scale)),
            )
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
            height, width = image.shape[:2]
        spare_rows, spare_columns = height - self.image_size, width - self.image_size
        if self.random_crop:
            top, left = int(rng.integers(spare_rows + 1)), int(rng.integers(spare_columns + 1))
        else:
            top, left = spare_rows // 2, spare_columns // 2
        crop = image[top : top + self.image_size, left : left + self.image_size]
        return {**element, "image": np.ascontiguousarray(crop)}


class RandomFlip(grain.transforms.RandomMap):
    """Mirrors the image horizontally with probability 1/2."""

    def random_map(self, element: Record, rng: np.random.Generator) -> Record:
        if rng.random() < 0.5:
            return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
        return element


class NormalizeImage(grain.transforms.Map):
    """Maps the uint8 image to float32 in [-1, 1]."""

    def map(self, element: Record) -> Record:
        image = element["image"].astype(np.float32) / 127.5 - 1.0
        return {**element, "image": image}


class Tokenize(grain.transforms.Map):
    """Adds "tokens", the caption as int32 (max_length,) ids (see ``tokenizer.encode``).

    Maps a record, or a batch whose "caption" is an array of strings: its "tokens" are then
    (batch, max_length), in one call of the tokenizer. The tokenizer is rebuilt from its
    JSON text on first use in each process, so the transform pickles as plain text.
    """

    def __init__(self, tokenizer_json: str, max_length: int):
        """Initialises the transform.

        Args:
            tokenizer_json: The tokenizer serialised as JSON text (``Tokenizer.to_str()``).
            max_length: Number of token ids per caption.
        """
        self.tokenizer_json = tokenizer_json
        self.max_length = max_length
        self._tokenizer: tokenizers.Tokenizer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def map(self, element: Record) -> Record:
        if self._tokenizer is None:
            self._tokenizer = tokenizers.Tokenizer.from_str(self.tokenizer_json)
        captions = np.asarray(element["caption"])
        tokens = word_tokenizer.encode(self._tokenizer, captions.ravel().tolist(), self.max_length)
        return {**element, "tokens": tokens.reshape(*captions.shape, self.max_length)}


class SelectKeys(grain.transforms.Map):
    """Keeps only the given keys of a record or a batch, e.g. to drop strings."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def map(self, element: Record) -> Record:
        missing = [key for key in self.keys if key not in element]
        if missing:
            raise KeyError(f"record has no key {missing}; it has {sorted(element)}.")
        return {key: element[key] for key in self.keys}
