"""Inception pool features of image batches on the mesh, and the dataset's cached reference.

The FID Inception runs in one jitted function on global batches sharded over the mesh's
data-parallel axes, its params replicated; only the (B, 2048) features come back to the
hosts. The reference features of a dataset are computed once per (data, split, image
count, image size, weights file) and cached as ``.npz`` under the workdir, so every sweep
and every re-run of one compares against the same statistics without recomputing them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ldm_jax import storage
from ldm_jax.data import pipeline
from ldm_jax.data.transforms import ResizeAndCrop
from ldm_jax.evaluate import batches
from ldm_jax.evaluate.reconstruction import local_image_batches
from ldm_jax.interop.inception_weights import load_inception
from ldm_jax.models.inception import IMAGE_SIZE, resize_for_inception
from ldm_jax.parallel import sharding

log = logging.getLogger(__name__)

REFERENCE_DIR = os.path.join("evaluate", "fid_reference")


class InceptionFeatures:
    """``features(images)``: uint8 global batches (B, H, W, 3) to (B, 2048) pool features."""

    def __init__(self, weights_path: str, mesh: Mesh, image_size: int = IMAGE_SIZE):
        module, params = load_inception(weights_path)
        self.weights_path, self.mesh = storage.as_path(weights_path), mesh
        self.params = jax.device_put(params, sharding.replicated(mesh))
        batch = sharding.batch_sharding(mesh)
        self._features = jax.jit(
            lambda p, x: module.apply({"params": p}, resize_for_inception(x, image_size)),
            in_shardings=(sharding.replicated(mesh), batch),
            out_shardings=batch,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._features(self.params, images)

    def of_source(
        self, source: Sequence[Mapping[str, Any]], count: int, image_size: int
    ) -> np.ndarray:
        """Features (count, 2048) of the first ``count`` records, resized and centre-cropped
        to ``image_size`` as the model's training images were, on every process."""
        batch_size = batches.batch_size_for(self.mesh, count)
        resize = ResizeAndCrop(image_size, random_crop=False)
        out = []
        for local in local_image_batches(source, count, batch_size, resize):
            batch = pipeline.global_batch(local, sharding.batch_sharding(self.mesh))
            features, valid = sharding.to_host((self(batch["image"]), batch["valid"]))
            out.append(features[valid])
        return np.concatenate(out)


def reference_features(
    extractor: InceptionFeatures,
    source: Sequence[Mapping[str, Any]],
    *,
    workdir: str,
    description: Mapping[str, Any],
    count: int,
    image_size: int,
) -> np.ndarray:
    """The Inception features of a dataset's first ``count`` images, cached in the workdir.

    Args:
      extractor: the Inception network on the mesh.
      source: the dataset's records.
      workdir: where ``evaluate/fid_reference/`` is.
      description: what identifies the data (source, path, split, ...), part of the cache key.
      count: how many images (at most ``len(source)``).
      image_size: the side the images are resized and cropped to first.
    """
    count = min(count, len(source))
    weights = storage.as_path(extractor.weights_path)
    key = {
        **description,
        "count": count,
        "image_size": image_size,
        "inception_weights": weights.name,
        "inception_weights_bytes": weights.stat().length,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = storage.join(workdir, REFERENCE_DIR, f"{digest}.npz")
    if storage.as_path(path).is_file():
        try:
            with np.load(
                io.BytesIO(storage.as_path(path).read_bytes()), allow_pickle=False
            ) as cached:
                features = cached["features"]
        except (OSError, ValueError, KeyError) as error:  # pickles are refused, not opened
            raise ValueError(
                f"the FID reference cache {path} is not a features file written by ldm_jax "
                f"({error}); delete it to compute the features again"
            ) from error
        log.info("FID reference: %d cached features from %s", len(features), path)
        return features
    log.info("FID reference: computing the features of %d dataset images", count)
    features = extractor.of_source(source, count, image_size)
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, features=features)
        storage.write_bytes(path, buffer.getvalue())
        text = json.dumps(key, indent=2, sort_keys=True)
        storage.write_text(path.removesuffix(".npz") + ".json", text)
    return features
