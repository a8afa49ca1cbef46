"""One global sequence of batches, whatever the number of processes that read it.

grain's ``ShardByJaxProcess`` gives each process its own shard of the records, so which
records make up a global batch depends on the process count: a run saved on 2 hosts and
resumed on 1 would see other batches than the run that never stopped. Here every process walks
the same global sequence (one shuffle of all records; random transforms seeded by the global
index) and reads, of each global batch, the contiguous block its devices hold: global batch
``b`` is records ``[b * G, (b + 1) * G)`` of the sequence on any number of processes.

The loader's iterator state then counts the same records on every process, and converting it
to another process count is a rescaling (``rescale_loader_state``).
"""

from __future__ import annotations

import copy

import grain


class ProcessBlockSampler:
    """Process ``process_index``'s records of ``sampler``'s sequence: its block of each batch.

    Args:
      sampler: The global sequence (unsharded), e.g. a shuffled ``grain.samplers.IndexSampler``.
      global_batch_size: Records per global batch; a multiple of ``process_count``.
      process_index: This process's index.
      process_count: The number of processes reading the sequence.
    """

    def __init__(
        self,
        sampler: grain.samplers.IndexSampler,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        self._sampler = sampler
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._offset = process_index * self._local_batch_size

    def __len__(self) -> int:
        # A finite sequence's last, partial global batch is split in order: the processes
        # after the first may get fewer of its records, or none.
        batches, remainder = divmod(len(self._sampler), self._global_batch_size)
        tail = min(max(remainder - self._offset, 0), self._local_batch_size)
        return batches * self._local_batch_size + tail

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        batch, position = divmod(index, self._local_batch_size)
        return self._sampler[batch * self._global_batch_size + self._offset + position]

    def __repr__(self) -> str:
        # grain compares a checkpoint's sampler by repr: leaving out the process index and
        # count lets every process, on any process count, restore the same state.
        return (
            f"ProcessBlockSampler({self._sampler!r}, global_batch_size={self._global_batch_size})"
        )


def rescale_loader_state(state: dict, saved_process_count: int, process_count: int) -> dict:
    """A ``grain.DataLoader`` state saved on ``saved_process_count`` processes, for
    ``process_count`` processes at the same position of the global sequence.

    Raises:
      ValueError: when the loader used worker processes (their records interleave by
        worker, so a position is not a count of records).
    """
    if state["worker_count"] != 0:
        raise ValueError(
            f"the data iterator was saved by {saved_process_count} processes with grain "
            f"workers (config.data.worker_count={state['worker_count']}); resume it on "
            f"{saved_process_count} processes"
        )
    records_read = (state["last_seen_indices"]["0"] + 1) * saved_process_count
    if records_read % process_count:
        raise ValueError(
            f"the data iterator's position ({records_read} records) does not split over "
            f"{process_count} processes"
        )
    rescaled = copy.deepcopy(state)
    rescaled["last_seen_indices"] = {"0": records_read // process_count - 1}
    return rescaled
