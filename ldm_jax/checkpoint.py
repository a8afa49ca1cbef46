"""Orbax checkpoints of one training stage: train state, data iterator and config, together.

Saves are asynchronous (training goes on while the host writes) and atomic: a checkpoint
directory appears under its final name only once complete, so a crash mid-save leaves the
previous checkpoint as the newest. Restoring takes an abstract state whose leaves carry the
target shardings, so a run saved on one mesh resumes on another, and the data iterator's
position is carried over to another number of processes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from ldm_jax.data.process_blocks import rescale_loader_state

log = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = "state", "data_iterator", "config"
_HALF_WRITTEN = "*.orbax-checkpoint-tmp*"
_GIB = 1024**3


class CheckpointSaveError(OSError):
    """A checkpoint save (possibly in the background) did not produce its checkpoint."""


class Checkpointer:
    """A stage's checkpoint directory: ``save`` every N steps, ``restore`` the newest.

    A save that fails in the background is reported by the next call to ``check``, ``save``
    or ``wait`` as a CheckpointSaveError naming the step, instead of leaving a silent gap.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_checkpointing: bool = True):
        self.directory = os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        half_written = sorted(glob.glob(os.path.join(self.directory, _HALF_WRITTEN)))
        if half_written:
            log.warning(
                "ignoring %d half-written checkpoint(s) in %s (an earlier run stopped while "
                "saving): %s; removing them and using the newest complete checkpoint",
                len(half_written),
                self.directory,
                ", ".join(os.path.basename(p) for p in half_written),
            )
            if jax.process_index() == 0:
                for path in half_written:
                    shutil.rmtree(path, ignore_errors=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_checkpointing,
            ),
        )
        self._unconfirmed: int | None = None  # a started save not yet seen on disk

    def check(self) -> None:
        """Raises CheckpointSaveError when the last started save finished without producing
        its checkpoint (a full disk, a lost bucket); cheap while the save is in progress."""
        if self._unconfirmed is None or self._manager.is_saving_in_progress():
            return
        step, self._unconfirmed = self._unconfirmed, None
        self._manager.reload()
        if step not in self._manager.all_steps():
            raise self._save_failed(step, "the error is logged above")

    def _save_failed(self, step: int | None, cause: str) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"the checkpoint of step {step} was not written to {self.directory} ({cause}); "
            f"the newest checkpoint there is step {self._manager.latest_step()}. Free space "
            "or fix access to the workdir and run the same command to resume"
        )

    def check_space(self, state: Any, min_free_gib: float) -> None:
        """Raises CheckpointSaveError unless the directory's disk has ``min_free_gib`` GiB
        free beyond the checkpoints of ``state`` still to be written (``max_to_keep`` of them,
        less those already there)."""
        state_bytes = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype")
        )
        to_write = max(1, self.max_to_keep - len(self.all_steps()))
        needed = min_free_gib * _GIB + state_bytes * to_write
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointSaveError(
                f"{self.directory} has {free / _GIB:.2f} GiB free but needs {needed / _GIB:.2f} "
                f"GiB: {to_write} checkpoint(s) of {state_bytes / _GIB:.2f} GiB plus "
                f"config.train.min_free_gib={min_free_gib}. Free space, choose another "
                "--workdir, or lower config.train.max_to_keep"
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, data_iterator: Any = None, config: dict | None = None
    ) -> None:
        """Starts saving ``state`` (and the iterator position and config) as ``step``."""
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[_CONFIG] = ocp.args.JsonSave(config)
        self.wait()  # the previous save first, checked (orbax would wait for it anyway)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unconfirmed = step
        self.check()

    def restore(
        self, abstract_state: Any, data_iterator: Any = None, step: int | None = None
    ) -> Any:
        """Restores the state onto the shardings of ``abstract_state``.

        When ``data_iterator`` is given its position is restored in place too, so the run sees
        exactly the batches an uninterrupted run would have seen, also when the checkpoint was
        saved by another number of processes.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        saved_process_count = self._saved_process_count(step)
        rescale = data_iterator is not None and saved_process_count not in (
            None,
            jax.process_count(),
        )
        if data_iterator is not None and not rescale:
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if rescale:
            self._restore_rescaled(step, data_iterator, saved_process_count)
        log.info("restored step %d from %s", step, self.directory)
        return restored[_STATE]

    def _data_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step), _DATA)

    def _saved_process_count(self, step: int) -> int | None:
        """How many processes saved the data iterator of ``step`` (None: no iterator saved)."""
        names = glob.glob(os.path.join(self._data_directory(step), "process_0-of-*.json"))
        match = re.search(r"-of-(\d+)\.json$", names[0]) if names else None
        return int(match.group(1)) if match else None

    def _restore_rescaled(self, step: int, data_iterator: Any, saved_process_count: int) -> None:
        """Sets the iterator to the position the ``saved_process_count`` processes reached
        (every process of a run holds the same position: see ``ldm_jax.data.process_blocks``)."""
        path = os.path.join(self._data_directory(step), f"process_0-of-{saved_process_count}.json")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        state = rescale_loader_state(saved, saved_process_count, jax.process_count())
        data_iterator.set_state(json.dumps(state).encode())
        data_iterator.start_prefetch()
        log.info(
            "data iterator of step %d carried over from %d to %d processes",
            step,
            saved_process_count,
            jax.process_count(),
        )

    def wait(self) -> None:
        """Blocks until every started save is on disk (raises if one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # raised again from the background save
            step, self._unconfirmed = self._unconfirmed, None
            raise self._save_failed(step, str(error)) from error
        self.check()

    def close(self) -> None:
        self._manager.close()
