"""From config to training data: the tokenizer, the conditioning images a record gains, and
an iterator of global sharded batches (the source itself is ``pipeline.datasets``')."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ldm_jax import storage
from ldm_jax.data import degradation, masks, pipeline, shapes, tokenizer, transforms
from ldm_jax.data.image_folder import ImageFolderSource
from ldm_jax.parallel import sharding
from ldm_jax.pipeline.workdir import TOKENIZER_FILE

# Threads reading records one batch ahead, by source. Image files and TFDS records are read
# from storage and decoded outside the GIL; shapes are drawn in Python and cached latents
# are a few kilobytes on a local disk, so for those a hand-off between threads costs more
# than the read.
READ_THREADS = {"shapes": 0, "image_folder": 16, "tfds": 16}


def caption_words(data: ml_collections.ConfigDict, source: Any) -> list[str]:
    """Every caption text the tokenizer has to know (the shapes vocabulary is known exactly)."""
    if data.source == "shapes":
        return shapes.caption_vocabulary()
    if isinstance(source, ImageFolderSource):  # captions without decoding every image
        return [source.caption(i) for i in range(len(source))]
    return [str(source[i]["caption"]) for i in range(len(source))]


def load_or_build_tokenizer(workdir: str, data: ml_collections.ConfigDict, source: Any):
    """The run's word tokenizer: built once from the captions (by every process alike, saved
    by process 0), then read from the workdir."""
    path = storage.join(workdir, TOKENIZER_FILE)
    if storage.as_path(path).exists():
        return tokenizer.load_tokenizer(path)
    tok = tokenizer.build_word_tokenizer(caption_words(data, source))
    if jax.process_index() == 0:
        tokenizer.save_tokenizer(tok, path)
    return tok


def conditioning_operations(kind: str, super_resolution_factor: int) -> list[grain.transforms.Map]:
    """The data transforms that add a training record's conditioning images (the images the
    U-Net of ``config.diffusion.concat_conditioning`` takes with its latents)."""
    if kind == "inpaint":
        return [masks.AddInpaintingMask()]
    if kind == "sr":
        return [degradation.AddLowResolution(super_resolution_factor)]
    return []


def make_batches(
    data: ml_collections.ConfigDict,
    source: Any,
    *,
    batch_size: int,
    seed: int,
    mesh: Mesh,
    tokenizer_json: str | None = None,
    keys: tuple[str, ...] = ("image",),
    images: bool = True,
    record_operations: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = (),
    read_threads: int | None = None,
) -> tuple[Any, Iterator[dict]]:
    """The checkpointable data position and the iterator of global batches sharded on ``mesh``.

    Both are one ``DevicePrefetch``: ``config.data.device_prefetch`` batches are on the devices
    ahead of the step, and the position saved with a checkpoint is after the last batch the
    loop took, so a resumed run sees exactly the batches an uninterrupted one would have.

    Images stay uint8 until they are on the device (4x less to transfer); the train steps
    scale them to [-1, 1]. With ``images=False`` (a source of encoded latents, read without
    threads) the image transforms are left out. ``record_operations`` follow them (the
    conditioning images of inpainting or super-resolution). Captions are tokenized and keys
    selected once per batch. ``read_threads`` overrides the source's number of threads
    reading records ahead (see ``pipeline.make_loader``).
    """
    operations: list = []
    if images and data.source != "shapes":
        operations.append(transforms.ResizeAndCrop(data.image_size, random_crop=data.random_crop))
    if images and data.random_flip:
        operations.append(transforms.RandomFlip())
    operations.extend(record_operations)
    batch_operations: list = []
    if tokenizer_json is not None:
        batch_operations.append(transforms.Tokenize(tokenizer_json, data.max_caption_length))
    batch_operations.append(transforms.SelectKeys(keys))
    default_threads = READ_THREADS[data.source] if images else 0
    loader = pipeline.make_loader(
        source,
        operations,
        global_batch_size=batch_size,
        seed=seed,
        batch_operations=batch_operations,
        shuffle=True,
        num_epochs=None,
        worker_count=data.worker_count,
        read_threads=default_threads if read_threads is None else read_threads,
    )
    batch_sharding = sharding.batch_sharding(mesh)

    def place(local: dict) -> dict:
        return pipeline.global_batch({k: np.asarray(local[k]) for k in keys}, batch_sharding)

    batches = pipeline.DevicePrefetch(iter(loader), place, data.device_prefetch)
    return batches, batches
