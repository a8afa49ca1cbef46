"""A random-access source over arrays held in host memory (for example encoded latents)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class InMemorySource:
    """Records ``{key: arrays[key][index], ..., "caption": captions[index]}``.

    Args:
      arrays: equal-length arrays, one per record key.
      captions: one caption per record (optional).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], captions: Sequence[str] | None = None):
        lengths = {key: len(value) for key, value in arrays.items()}
        if captions is not None:
            lengths["caption"] = len(captions)
        if len(set(lengths.values())) != 1:
            raise ValueError(f"InMemorySource needs arrays of one length, got {lengths}")
        self._arrays = dict(arrays)
        self._captions = list(captions) if captions is not None else None
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        record = {key: value[index] for key, value in self._arrays.items()}
        if self._captions is not None:
            record["caption"] = self._captions[index]
        return record

    def __repr__(self) -> str:
        shapes = {key: value.shape for key, value in self._arrays.items()}
        return f"InMemorySource({shapes}, captions={self._captions is not None})"
