"""The dataset a config names, as a grain source: training reads it in batches, evaluation
takes its validation images (reconstructions, FID references) and the preview grids their
captions, labels and low-resolution inputs."""

from __future__ import annotations

from typing import Any

import ml_collections

from ldm_jax.data import shapes
from ldm_jax.data.image_folder import ImageFolderSource
from ldm_jax.data.tfds_source import TfdsSource


def make_source(data: ml_collections.ConfigDict, split: str, seed: int) -> Any:
    """The grain source named by ``config.data.source`` (an explicit dispatch, no registry)."""
    if data.source == "shapes":
        num = data.num_train_examples if split == data.train_split else None
        return shapes.ShapesSource(
            split=split, image_size=data.image_size, num_examples=num, seed=seed
        )
    if data.source == "image_folder":
        return ImageFolderSource(data.path)
    if data.source == "tfds":
        return TfdsSource(data.tfds_name, split=split, data_dir=data.tfds_data_dir or None)
    raise ValueError(f"unknown config.data.source={data.source!r}")


def validation_records(config: ml_collections.ConfigDict, count: int) -> list[dict]:
    """The first ``count`` records of the evaluation split (fewer if it is smaller)."""
    source = make_source(config.data, config.data.eval_split, config.seed)
    return [source[i] for i in range(min(count, len(source)))]
