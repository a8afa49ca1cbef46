"""Orbax checkpoints of one training stage: train state, data iterator and config, together.

Saves are asynchronous (training goes on while the host writes) and atomic: a checkpoint
directory appears under its final name only once complete, so a crash mid-save leaves the
previous checkpoint as the newest. Restoring takes an abstract state whose leaves carry the
target shardings, so a run saved on one mesh resumes on another, and the data iterator's
position is carried over to another number of processes.

The state's small replicated arrays (biases, norms, the optimizer's counts: most of the
arrays of a model, a small part of its bytes) are saved packed, one array per dtype beside an
index of names, shapes and offsets, because a save costs about 1.5 ms of host time per array
whatever its size (orbax and tensorstore bookkeeping): the quickstart's 1,267 arrays took
2 s of CPU per save, competing with training, and 16 arrays of the same 20 MB take 0.03 s.
Large or sharded arrays are saved one by one as before, each process writing its shards.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax import storage
from ldm_jax.data.process_blocks import rescale_loader_state

log = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = "state", "data_iterator", "config"
_SMALL, _SMALL_INDEX = "small_arrays", "small_arrays_index"
PACK_MAX_BYTES = 1 << 20  # arrays up to this size (and replicated) are saved packed
_HALF_WRITTEN = "*.orbax-checkpoint-tmp*"
# On GCS orbax writes a step in place and marks it complete with this file last.
_COMMIT_FILE = "commit_success.txt"
_GIB = 1024**3


# Bucket schemes whose checkpoints orbax (0.12) cannot write: it builds TensorStore specs for
# local paths and gs:// only (an s3:// step folder becomes "s3:/bucket/...", "not absolute").
UNSUPPORTED_SCHEMES = ("s3://",)


def check_location(directory: str, flag: str = "--workdir") -> None:
    """Raises OSError, one line naming ``flag``, for a place orbax cannot checkpoint to."""
    if str(directory).startswith(UNSUPPORTED_SCHEMES):
        raise OSError(
            f"{flag}={directory}: orbax cannot write checkpoints to s3:// buckets; keep the "
            "workdir on gs:// or a filesystem every host mounts (data may stay on s3://)"
        )


class CheckpointSaveError(OSError):
    """A checkpoint save (possibly in the background) did not produce its checkpoint."""


class Checkpointer:
    """A stage's checkpoint directory: ``save`` every N steps, ``restore`` the newest.

    A save that fails in the background is reported by the next call to ``check``, ``save``
    or ``wait`` as a CheckpointSaveError naming the step, instead of leaving a silent gap.
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        async_checkpointing: bool = True,
        pack_max_bytes: int = PACK_MAX_BYTES,
    ):
        check_location(directory, flag="checkpoint directory")
        self.directory = str(storage.as_path(directory))  # orbax takes absolute paths only
        self.max_to_keep = max_to_keep
        self.pack_max_bytes = pack_max_bytes  # 0: every array saved on its own
        half_written = _half_written(storage.as_path(self.directory))
        if half_written:
            log.warning(
                "ignoring %d half-written checkpoint(s) in %s (an earlier run stopped while "
                "saving): %s; removing them and using the newest complete checkpoint",
                len(half_written),
                self.directory,
                ", ".join(p.name for p in half_written),
            )
            if jax.process_index() == 0:
                for path in half_written:
                    path.rmtree(missing_ok=True)
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
        free = storage.free_bytes(self.directory)
        if free is not None and free < needed:
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
        """Starts saving ``state`` (and the iterator position and config) as ``step``.

        Blocks while the small arrays are copied to the host and packed (milliseconds), then
        the writing goes on in the background.
        """
        rest, packed, index = pack_small_arrays(state, self.pack_max_bytes)
        items = {}
        if index["arrays"]:
            items[_SMALL] = ocp.args.StandardSave(packed)
            items[_SMALL_INDEX] = ocp.args.JsonSave(index)
        if jax.tree.leaves(rest):
            items[_STATE] = ocp.args.StandardSave(rest)
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
        index = self._small_index(step)
        items = {}
        if index is None:  # a checkpoint with every array on its own
            items[_STATE] = ocp.args.StandardRestore(abstract_state)
        else:
            rest = _without_small_arrays(abstract_state, index)
            items[_SMALL] = ocp.args.StandardRestore(_packed_targets(index))
            if jax.tree.leaves(rest):
                items[_STATE] = ocp.args.StandardRestore(rest)
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
        if index is None:
            return restored[_STATE]
        return _with_small_arrays(
            abstract_state, restored.get(_STATE), restored[_SMALL], index, self.directory
        )

    def restore_part(self, abstract_part: dict, step: int | None = None) -> dict:
        """Restores part of a saved state, and only that part, onto the shardings of
        ``abstract_part``'s leaves: each device reads its own shards of those arrays alone.

        Args:
          abstract_part: nested dicts of ``ShapeDtypeStruct``s (with shardings) along the saved
            state's field names, e.g. ``{"ema_params": {...}}`` of a stage-2 train state: what
            inference needs, without the optimizer state.
          step: the step to read (default: the newest).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        index = self._small_index(step)
        if index is not None:
            wanted = {
                _path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_part)[0]
            }
            index = {**index, "arrays": [e for e in index["arrays"] if e["path"] in wanted]}
        rest = abstract_part if index is None else _without_small_arrays(abstract_part, index)
        items = {}
        if jax.tree.leaves(rest):
            items[_STATE] = ocp.args.PyTreeRestore(
                item=rest,
                restore_args=ocp.checkpoint_utils.construct_restore_args(rest),
                partial_restore=True,
            )
        if index is not None and index["arrays"]:
            items[_SMALL] = ocp.args.StandardRestore(_packed_targets(index))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored part of step %d from %s", step, self.directory)
        if index is None:
            return restored[_STATE]
        return _with_small_arrays(
            abstract_part, restored.get(_STATE), restored.get(_SMALL), index, self.directory
        )

    def _small_index(self, step: int) -> dict | None:
        """The index of ``step``'s packed small arrays (None: it has none)."""
        if not storage.as_path(self.directory).joinpath(str(step), _SMALL_INDEX).is_dir():
            return None
        items = {_SMALL_INDEX: ocp.args.JsonRestore()}
        return self._manager.restore(step, args=ocp.args.Composite(**items))[_SMALL_INDEX]

    def _data_directory(self, step: int):
        return storage.as_path(self.directory) / str(step) / _DATA

    def _saved_process_count(self, step: int) -> int | None:
        """How many processes saved the data iterator of ``step`` (None: no iterator saved)."""
        names = [p.name for p in self._data_directory(step).glob("process_0-of-*.json")]
        match = re.search(r"-of-(\d+)\.json$", names[0]) if names else None
        return int(match.group(1)) if match else None

    def _restore_rescaled(self, step: int, data_iterator: Any, saved_process_count: int) -> None:
        """Sets the iterator to the position the ``saved_process_count`` processes reached
        (every process of a run holds the same position: see ``ldm_jax.data.process_blocks``)."""
        path = self._data_directory(step) / f"process_0-of-{saved_process_count}.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
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


def _half_written(directory) -> list:
    """Checkpoints an interrupted save left: orbax's temporary folders on a disk; on GCS,
    where orbax writes a step in place, step folders without their commit file."""
    if not directory.is_dir():
        return []
    found = list(directory.glob(_HALF_WRITTEN))
    if str(directory).startswith("gs://"):
        found += [
            p for p in directory.iterdir() if p.name.isdigit() and not (p / _COMMIT_FILE).exists()
        ]
    return sorted(found)


def _path_name(path: tuple) -> str:
    """A leaf's path as "params/unet/conv_in/kernel" (dict keys, fields, list indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def read_arrays(step_directory: str) -> dict[str, np.ndarray]:
    """Every array of the state saved in ``step_directory`` (``<checkpoint dir>/<step>``) as a
    host array, by path ("params/unet/conv_in/kernel"), whatever mesh saved it: a checkpoint
    read without building the model, to inspect or compare."""
    step_directory = storage.as_path(step_directory)  # orbax takes absolute paths only
    arrays: dict[str, np.ndarray] = {}
    state_dir = step_directory / _STATE
    if state_dir.is_dir():
        checkpointer = ocp.PyTreeCheckpointer()
        tree = ocp.PyTreeCheckpointHandler().metadata(state_dir)
        tree = getattr(tree, "tree", tree)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=args))
        for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
            arrays[_path_name(path)] = np.asarray(value)
    index_dir = step_directory / _SMALL_INDEX
    if index_dir.is_dir():
        index = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(index_dir)
        packed = ocp.StandardCheckpointer().restore(step_directory / _SMALL, _packed_targets(index))
        for entry in index["arrays"]:
            arrays[entry["path"]] = _unpacked(packed, entry)
    if not arrays:
        raise FileNotFoundError(f"no saved state in {step_directory}")
    return dict(sorted(arrays.items()))


def _is_small(x: Any, max_bytes: int) -> bool:
    """A replicated numeric array of at most ``max_bytes``: packed into its dtype's array."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or not x.is_fully_replicated:
            return False
    elif not isinstance(x, np.ndarray):
        return False
    return x.nbytes <= max_bytes


def pack_small_arrays(state: Any, max_bytes: int = PACK_MAX_BYTES) -> tuple[Any, dict, dict]:
    """Splits off ``state``'s small replicated arrays, copied to the host and concatenated.

    Returns:
      (state with those arrays replaced by None, {dtype name: 1-D host array},
      index: {"arrays": [{"path", "dtype", "offset", "shape"}, ...], "sizes": {dtype: n}}).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    is_small = [_is_small(x, max_bytes) for _, x in flat]
    small = [leaf for leaf, packed in zip(flat, is_small, strict=True) if packed]
    host = jax.device_get(
        [x.addressable_data(0) if isinstance(x, jax.Array) else x for _, x in small]
    )
    parts: dict[str, list[np.ndarray]] = {}
    arrays, sizes = [], {}
    for (path, _), value in zip(small, host, strict=True):
        dtype = np.dtype(value.dtype).name
        offset = sizes.get(dtype, 0)
        arrays.append(
            {
                "path": _path_name(path),
                "dtype": dtype,
                "offset": offset,
                "shape": list(value.shape),
            }
        )
        parts.setdefault(dtype, []).append(np.ravel(value))
        sizes[dtype] = offset + value.size
    packed = {dtype: np.concatenate(values) for dtype, values in parts.items()}
    rest = treedef.unflatten(
        [None if packed else x for (_, x), packed in zip(flat, is_small, strict=True)]
    )
    return rest, packed, {"arrays": arrays, "sizes": sizes}


def _without_small_arrays(abstract_state: Any, index: dict) -> Any:
    """The abstract state with the packed arrays replaced by None."""
    names = {entry["path"] for entry in index["arrays"]}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: None if _path_name(path) in names else x, abstract_state
    )


def _packed_targets(index: dict) -> dict[str, np.ndarray]:
    """Restore targets of the packed arrays: one 1-D host array per dtype."""
    return {
        dtype: np.empty((size,), jax.numpy.dtype(dtype)) for dtype, size in index["sizes"].items()
    }


def _unpacked(packed: dict[str, np.ndarray], entry: dict) -> np.ndarray:
    """The array an index entry names, cut out of its dtype's packed array."""
    size = int(np.prod(entry["shape"], dtype=np.int64))
    start = entry["offset"]
    return packed[entry["dtype"]][start : start + size].reshape(entry["shape"])


def _with_small_arrays(
    abstract_state: Any, restored: Any, packed: dict, index: dict, directory: str
) -> Any:
    """``abstract_state`` filled: the packed arrays cut out of ``packed`` and placed on their
    leaf's sharding, the others from ``restored``."""
    entries = {entry["path"]: entry for entry in index["arrays"]}
    from_state = {
        _path_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]
    }
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    leaves = []
    for path, target in flat:
        name = _path_name(path)
        entry = entries.get(name)
        if entry is None:
            leaves.append(from_state[name])
            continue
        shape = tuple(entry["shape"])
        if shape != tuple(target.shape):
            raise ValueError(
                f"checkpoint in {directory}: array {name} has shape {shape}, the model "
                f"expects {tuple(target.shape)}; the config differs from the one that saved it"
            )
        value = _unpacked(packed, entry).astype(target.dtype)
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            leaves.append(jax.numpy.asarray(value))
        else:
            leaves.append(jax.make_array_from_callback(shape, sharding, lambda i, v=value: v[i]))
    return jax.tree_util.tree_unflatten(treedef, leaves)
