"""A grain source over a TFDS dataset prepared as ArrayRecord, read without TensorFlow.

The dataset must already be prepared in ``data_dir`` with ``file_format="array_record"``
(``tfds build --file_format=array_record`` or ``builder.download_and_prepare()``); nothing
is downloaded or prepared here.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax import storage

_DATASET_HINT = (
    "set --config.data.tfds_name and --config.data.tfds_data_dir to a dataset prepared "
    'there with file_format="array_record"'
)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Returns a uint8 (H, W, 3) image from TFDS's (H, W, C) with C in 1 (gray), 3 or 4."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[:, :, :3])


def _to_text(value: bytes | str | np.ndarray) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """A grain random-access source over one split of a prepared TFDS dataset.

    Records are ``{"image": uint8 (H, W, 3), "label": int32 scalar, "caption": str}``; the
    label is -1 without ``label_key`` and the caption "" without ``caption_key``. Images
    with an alpha channel lose it.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        image_key: str = "image",
        label_key: str | None = "label",
        caption_key: str | None = None,
    ):
        """Opens the split.

        Args:
            name: Dataset name, optionally with config and version ("name/config:1.0.0").
            split: Split, with TFDS slicing if wanted ("train", "train[:90%]").
            data_dir: Folder holding the prepared dataset; None uses TFDS's default.
            image_key: Feature holding the image.
            label_key: Feature holding an integer class label, if any.
            caption_key: Feature holding a text caption, if any.

        Raises:
            FileNotFoundError: If the dataset is not prepared in ``data_dir``.
            ValueError: If a key names no feature of the dataset.
        """
        self.name, self.split, self.data_dir = name, split, data_dir
        if data_dir and storage.is_remote(data_dir):
            # ArrayRecord opens its shards by name: a dataset in a bucket is read from a local
            # copy of its folder (fetched once per host, see ldm_jax.storage.local_copy).
            folder = storage.local_copy(storage.join(data_dir, name.split("/")[0].split(":")[0]))
            data_dir = os.path.dirname(folder)
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in data_dir={self.data_dir!r}: "
                f"{_DATASET_HINT}."
            ) from None
        features = builder.info.features
        for argument, key in (
            ("image_key", image_key),
            ("label_key", label_key),
            ("caption_key", caption_key),
        ):
            if key is not None and key not in features:
                raise ValueError(
                    f"{argument}={key!r} is not a feature of {name!r}; it has {sorted(features)}."
                )
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self._data_source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        example = self._data_source[int(index)]
        label = -1 if self.label_key is None else int(example[self.label_key])
        caption = "" if self.caption_key is None else _to_text(example[self.caption_key])
        return {
            "image": _to_rgb(example[self.image_key]),
            "label": np.int32(label),
            "caption": caption,
        }

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"
