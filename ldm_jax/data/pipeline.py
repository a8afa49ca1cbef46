"""Batches from a grain source, sharded per JAX process, and their assembly into global arrays.

Every process walks the same shuffled sequence of records and batches its own
``global_batch_size // jax.process_count()`` of each global batch (``ProcessBlockSampler``),
so the global batches do not depend on the process count; ``global_batch`` then joins the
per-process batches into one ``jax.Array`` laid out by the caller's sharding. The loader's
iterator state (``get_state``/``set_state``, or ``grain.checkpoint`` in an orbax checkpoint)
resumes at exactly the next batch. ``DevicePrefetch`` puts batches on the devices ahead of the
step that takes them and keeps that guarantee: its state is the position after the last batch
taken, not after the last one read.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from ldm_jax.data.process_blocks import ProcessBlockSampler


def make_loader(
    source: grain.sources.RandomAccessDataSource,
    operations: Sequence[grain.transforms.Map | grain.transforms.RandomMap],
    *,
    global_batch_size: int,
    seed: int,
    batch_operations: Sequence[grain.transforms.Map] = (),
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int = 0,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """Builds a deterministic, checkpointable loader of this process's batches.

    Args:
        source: A random-access source (``__len__`` and ``__getitem__``).
        operations: Per-record transforms, applied in order before batching.
        global_batch_size: Records per step over all processes.
        batch_operations: Transforms of whole batches, applied in order after batching:
            one call per batch instead of one per record (grain's per-record cost is
            tens of microseconds per operation).
        seed: Seed of the shuffle and of every random transform.
        shuffle: Shuffle the records anew each epoch.
        num_epochs: Epochs to read; None reads forever.
        worker_count: Worker processes for the transforms; 0 transforms in this process.
            Each worker batches its own records, so batches depend on the worker count as
            well as the seed: resume a checkpoint with the count it was saved with. Outside
            ``absl.app.run``, call ``absl.flags.FLAGS.mark_as_parsed()`` before using workers.
        read_threads: Threads reading records from the source one batch ahead of the
            transforms (in each process or worker). 0 reads a record when the transforms
            ask for it: best when reads are cheaper than a hand-off between threads
            (records drawn in Python, small records on a local disk). Threads pay off for
            reads that wait on storage or decode outside the GIL. Batches are the same
            either way.
        drop_remainder: Drop the last batch of the stream if it is incomplete.

    Returns:
        A ``grain.DataLoader`` whose batches hold ``global_batch_size // process_count``
        records.

    Raises:
        ValueError: If the batch size is not a positive multiple of the process count.
    """
    process_count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size must be a positive multiple of the number of JAX processes, "
            f"got global_batch_size={global_batch_size} with {process_count} processes."
        )
    sampler = ProcessBlockSampler(
        grain.samplers.IndexSampler(
            num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed
        ),
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=process_count,
    )
    local_batch_size = global_batch_size // process_count
    batch = grain.transforms.Batch(batch_size=local_batch_size, drop_remainder=drop_remainder)
    # grain scans its whole read-ahead buffer for every record it returns, so the buffer is
    # one batch, not grain's default of 500 records.
    read_options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=local_batch_size if read_threads else 0
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*operations, batch, *batch_operations],
        worker_count=worker_count,
        # The sampler already gives this process its records.
        shard_options=grain.sharding.NoSharding(),
        read_options=read_options,
    )


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Joins every process's batch into global arrays.

    Args:
        local_batch: This process's batch; all processes give the same keys, dtypes and
            shapes.
        sharding: How the global arrays are laid out, typically a ``NamedSharding`` that
            splits the leading (batch) axis over the data-parallel mesh axes.

    Returns:
        The global batch: each array's leading axis is the process-local one times the
        number of processes.
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


class DevicePrefetch:
    """Batches read and placed on the devices ``depth`` batches ahead of the one taken.

    The step that takes a batch is dispatched asynchronously, so while it runs the next
    batches are read, transformed and transferred, and the step after it does not wait for
    its input. A checkpointable stand-in for the iterator it reads: ``get_state`` is the
    position after the last batch handed out (the position the grain iterator had then),
    ``set_state`` drops the batches read ahead. Nothing is read before the first ``next``, so
    a state restored between construction and the first batch is the one read from.

    Args:
        iterator: A grain ``DataLoader`` iterator (``get_state``, ``set_state``,
            ``start_prefetch``) of this process's batches.
        place: Turns one of its batches into arrays on the devices (``global_batch``).
        depth: Batches held on the devices beyond the one handed out; 0 reads each batch
            when it is asked for.
    """

    def __init__(self, iterator: Any, place: Callable[[Any], dict], depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._iterator, self._place, self._depth = iterator, place, depth
        self._ahead: collections.deque[tuple[dict, bytes | None]] = collections.deque()
        self._taken_state: bytes | None = None  # the iterator's position after the last batch

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while len(self._ahead) <= self._depth:
            try:
                batch = self._place(next(self._iterator))
            except StopIteration:
                break
            # Recorded only when read ahead: with depth 0 the iterator's own state is current.
            self._ahead.append((batch, self._iterator.get_state() if self._depth else None))
        if not self._ahead:
            raise StopIteration
        batch, self._taken_state = self._ahead.popleft()
        return batch

    def get_state(self) -> bytes:
        """The position after the last batch handed out (where a resumed run starts)."""
        if self._ahead:
            return self._taken_state
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self._ahead.clear()
        self._taken_state = None
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        self._iterator.start_prefetch()
