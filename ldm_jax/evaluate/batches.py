"""Evaluation batches split over every device and process, padded to a whole global batch.

Global batch ``b`` covers items ``b * batch_size`` onwards; process ``p`` handles the
``p``-th contiguous slice of it and joins its rows to the others' with
``pipeline.global_batch``; per-item results come back to every host through
``sharding.to_host``, and process 0 writes them. Rows past the last item are padding,
marked invalid and dropped from the results, so every process contributes alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from ldm_jax.parallel import mesh as mesh_lib

MAX_BATCH_SIZE = 64


def batch_size_for(mesh: Mesh, count: int, max_batch_size: int = MAX_BATCH_SIZE) -> int:
    """The global batch for ``count`` items: at most about ``max_batch_size``, a multiple of
    the mesh's data-parallel size and of the number of processes."""
    shards = math.lcm(mesh_lib.data_parallel_size(mesh), jax.process_count())
    return -(-min(max_batch_size, max(count, 1)) // shards) * shards


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the mesh and the processes can split ``batch_size``."""
    shards = mesh_lib.data_parallel_size(mesh)
    processes = jax.process_count()
    if batch_size <= 0 or batch_size % shards or batch_size % processes:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of the mesh's data-parallel "
            f"size ({shards}) and of the number of JAX processes ({processes})"
        )


def local_rows(count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's item indices and validity in each global batch over ``count`` items.

    Yields:
      ``(indices, valid)``, both ``(batch_size // process_count,)``: padding rows repeat
      the process's last real item (or the very last item when it has none).
    """
    local_size = batch_size // jax.process_count()
    for start in range(0, count, batch_size):
        first = start + jax.process_index() * local_size
        indices = np.arange(first, first + local_size)
        valid = indices < count
        last = indices[valid][-1] if valid.any() else count - 1
        yield np.where(valid, indices, last), valid
