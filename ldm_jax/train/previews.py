"""What the sample grids written during stage-2 training show."""

from __future__ import annotations

import ml_collections
import numpy as np

from ldm_jax.data import degradation, shapes
from ldm_jax.train import data as data_lib

_NUM_VALIDATION_PREVIEWS = 16


def _validation_records(config: ml_collections.ConfigDict) -> list[dict]:
    source = data_lib.make_source(config.data, config.data.eval_split, config.seed)
    return [source[i] for i in range(min(_NUM_VALIDATION_PREVIEWS, len(source)))]


def preview_prompts(config: ml_collections.ConfigDict) -> tuple[list[str], list[int]]:
    """Prompts and labels of the grid: every colour x shape of the shapes dataset, else (and
    for super-resolution, whose inputs are validation images) the first validation records'."""
    if config.data.source == "shapes" and config.diffusion.concat_conditioning != "sr":
        prompts, labels = zip(*shapes.class_prompts(), strict=True)
        return list(prompts), list(labels)
    records = _validation_records(config)
    return [str(r["caption"]) for r in records], [int(r["label"]) for r in records]


def preview_images(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The grid's image inputs (``generate.MODE_INPUTS``): the low-resolution validation
    images of ``preview_prompts`` for a super-resolution model, else none."""
    if config.diffusion.concat_conditioning != "sr":
        return {}
    factor = config.diffusion.super_resolution_factor
    images = [degradation.downsample(r["image"], factor) for r in _validation_records(config)]
    return {"low_res": np.stack(images)}
