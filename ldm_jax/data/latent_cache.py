"""A latent cache: a dataset encoded once by the frozen autoencoder, stored as ArrayRecord.

Stage 2 reads the cached posterior means and stds (drawing a fresh latent sample each time
a record is used) instead of running the encoder at every step. Layout of a cache folder::

    out/
      metadata.json                                   what was encoded, by which autoencoder
      latents-00000-of-00002-00000.array_record       process 0's records, in source order
      latents-00000-of-00002-00001.array_record
      latents-00001-of-00002-00000.array_record       process 1's records follow
      ...

Each record is one msgpack map (never a pickle): ``latent_mean`` and ``latent_std`` float32
(h, w, c), ``label`` int32, ``caption`` str, and optional extra arrays (``index``, the
record's position in the source; ``codes`` int32 (h, w), the codebook indices of a VQ
autoencoder). Arrays are stored as ``{"dtype", "shape", "bytes"}`` maps.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import grain
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ldm_jax import storage

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "latents-*.array_record"
REQUIRED_METADATA = ("num_records", "latent_shape", "latent_scale", "keys", "files")
_RUN_HINT = "run `ldm-jax cache-latents --workdir=STAGE1_DIR --out={directory}` first"
_ARRAY_FIELDS = frozenset(("dtype", "shape", "bytes"))


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def _encode_value(key: str, value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(
                f"record key {key!r}: arrays must be numeric or bool, got dtype {array.dtype}"
            )
        return {
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "bytes": np.ascontiguousarray(array).tobytes(),
        }
    if isinstance(value, (str, bytes, bool, int, float)):
        return value
    raise TypeError(
        f"record key {key!r}: values must be numpy arrays, str, bytes, int, float or bool, "
        f"got {type(value).__name__}"
    )


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and value.keys() == _ARRAY_FIELDS:
        array = np.frombuffer(value["bytes"], dtype=np.dtype(value["dtype"]))
        array = array.reshape(value["shape"]).copy()  # writable, like any other source's
        return array[()] if array.ndim == 0 else array
    return value


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises a flat record of numpy arrays and plain values to msgpack bytes.

    Raises:
      TypeError: naming the key of a value that is neither a numeric array nor a plain
        str/bytes/int/float/bool.
    """
    return msgpack.packb(
        {str(key): _encode_value(key, value) for key, value in record.items()},
        use_bin_type=True,
    )


def decode_record(data: bytes) -> dict[str, Any]:
    """The record ``encode_record`` wrote: arrays come back with their dtypes and shapes
    (0-d arrays as numpy scalars), strings as str."""
    return {key: _decode_value(value) for key, value in msgpack.unpackb(data, raw=False).items()}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def shard_file_name(process_index: int, process_count: int, shard: int) -> str:
    """Names that sort into source order: by process, then by shard within the process."""
    return f"latents-{process_index:05d}-of-{process_count:05d}-{shard:05d}.array_record"


class LatentCacheWriter:
    """Writes one process's records into ArrayRecord shards of ``records_per_shard`` each.

    Every process of a run writes its own files into the same (shared) folder; files are
    opened on the first record, so a process without records writes none. In a bucket, each
    shard is written to a local temporary file first (ArrayRecord writes files by name) and
    uploaded when complete. Use as a context manager; ``num_written`` counts the records
    written.

    Args:
      directory: the cache folder (created if missing), on a disk or in a bucket.
      process_index: this process's index (``jax.process_index()``).
      process_count: the number of writing processes (``jax.process_count()``).
      records_per_shard: records per file before the next file is started.
    """

    def __init__(
        self,
        directory: str,
        process_index: int,
        process_count: int,
        records_per_shard: int = 2048,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index must be in [0, process_count={process_count}), got {process_index}"
            )
        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
        self.directory = directory
        self.process_index = process_index
        self.process_count = process_count
        self.records_per_shard = records_per_shard
        self.num_written = 0
        self._writer: ArrayRecordWriter | None = None
        self._shard: tuple[str, str] | None = None  # (file written, where it belongs)
        self._staging = (
            tempfile.mkdtemp(prefix="ldm_jax_cache_") if storage.is_remote(directory) else None
        )
        if self._staging is None:
            storage.as_path(directory).mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        """Appends one record (see ``encode_record``)."""
        data = encode_record(record)
        if self.num_written % self.records_per_shard == 0:
            self._close_shard()
            name = shard_file_name(
                self.process_index, self.process_count, self.num_written // self.records_per_shard
            )
            target = storage.join(self.directory, name)
            local = os.path.join(self._staging, name) if self._staging else target
            self._shard = (local, target)
            # group_size:1 keeps every record individually addressable (random access).
            self._writer = ArrayRecordWriter(local, "group_size:1")
        self._writer.write(data)
        self.num_written += 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            local, target = self._shard
            if local != target:
                storage.upload(local, target)
                os.unlink(local)

    def close(self) -> None:
        self._close_shard()
        if self._staging is not None:
            os.rmdir(self._staging)
            self._staging = None

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def shard_files(directory: str) -> list[str]:
    """The cache's shard file names in ``directory``, in record order."""
    return sorted(p.name for p in storage.as_path(directory).glob(SHARD_PATTERN))


def write_metadata(directory: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Writes ``metadata.json`` once every process has written its shards (process 0's job).

    ``files`` (the shards present, in order), ``num_records`` (counted in them) and
    ``format_version`` are filled in; the caller gives ``latent_shape``, ``latent_scale``,
    ``keys`` and a description of the autoencoder and of the source. The file is replaced
    atomically, so a reader never sees half of it.

    Returns:
      The metadata written.

    Raises:
      ValueError: if ``metadata["num_records"]`` is given and differs from the records in
        the shards, or a required key is missing.
    """
    files = shard_files(directory)
    counted = _count_records([storage.join(directory, name) for name in files])
    if metadata.get("num_records", counted) != counted:
        raise ValueError(
            f"metadata says num_records={metadata['num_records']} but the shards in "
            f"{directory} hold {counted} records"
        )
    full = {**metadata, "num_records": counted, "files": files, "format_version": FORMAT_VERSION}
    missing = [key for key in REQUIRED_METADATA if key not in full]
    if missing:
        raise ValueError(f"latent cache metadata needs the keys {missing}")
    text = json.dumps(full, indent=2, sort_keys=True)
    storage.write_text(storage.join(directory, METADATA_FILE), text)
    return full


def _count_records(paths: list[str]) -> int:
    if not paths:
        return 0
    with grain.sources.ArrayRecordDataSource([storage.local_copy(p) for p in paths]) as records:
        return len(records)


def read_metadata(directory: str) -> dict[str, Any] | None:
    """The cache's metadata, or None when ``directory`` holds no (finished) cache."""
    path = storage.join(directory, METADATA_FILE)
    if not storage.as_path(path).exists():
        return None
    try:
        return json.loads(storage.as_path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(
            f"{path} is not the JSON file `ldm-jax cache-latents` writes ({error}); "
            f"re-create the cache ({_RUN_HINT.format(directory=directory)})"
        ) from error


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class LatentCacheSource:
    """A grain random-access source over a latent cache, records in source order.

    Records are ``{"latent_mean": float32 (h, w, c), "latent_std": float32 (h, w, c),
    "label": int32, "caption": str, ...}`` plus the extra keys the cache holds. Pickles
    without open files (grain's spawned workers reopen them lazily).

    Args:
      directory: a folder written by ``ldm-jax cache-latents``.

    Raises:
      FileNotFoundError: if the folder, its ``metadata.json`` or a shard is missing.
      ValueError: if the metadata is of another format version or not JSON, the shards are
        not ArrayRecord files, or they do not hold the number of records it states.
    """

    def __init__(self, directory: str):
        self.directory = str(storage.as_path(directory))
        hint = _RUN_HINT.format(directory=directory)
        if not storage.as_path(directory).is_dir():
            raise FileNotFoundError(f"latent cache folder {directory} does not exist: {hint}")
        metadata = read_metadata(directory)
        if metadata is None:
            raise FileNotFoundError(
                f"{storage.join(directory, METADATA_FILE)} not found: {directory} holds no "
                f"finished latent cache; {hint}"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"latent cache {directory} has format_version "
                f"{metadata.get('format_version')!r}; this version reads {FORMAT_VERSION}: "
                f"re-create it ({hint})"
            )
        if not metadata["files"]:
            raise ValueError(f"latent cache {directory} holds no records; re-create it ({hint})")
        paths = [storage.join(directory, name) for name in metadata["files"]]
        missing = [p for p in paths if not storage.as_path(p).exists()]
        if missing:
            raise FileNotFoundError(
                f"latent cache {directory} is incomplete: missing {missing[:3]}; re-create it "
                f"({hint})"
            )
        self.metadata = metadata
        try:
            # ArrayRecord opens files by name: shards in a bucket are read from local copies.
            self._records = grain.sources.ArrayRecordDataSource(
                [storage.local_copy(p) for p in paths]
            )
        except (OSError, RuntimeError, ValueError) as error:  # ArrayRecord's corrupt-file errors
            raise ValueError(
                f"latent cache {directory}: its shards are not ArrayRecord files written by "
                f"`ldm-jax cache-latents` ({error}); re-create it ({hint})"
            ) from error
        if len(self._records) != metadata["num_records"]:
            raise ValueError(
                f"latent cache {directory}: metadata.json says num_records="
                f"{metadata['num_records']} but its shards hold {len(self._records)}; "
                f"re-create it ({hint})"
            )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["latent_shape"])

    @property
    def latent_scale(self) -> float:
        return float(self.metadata["latent_scale"])

    def check_latent_shape(self, expected: tuple[int, ...]) -> None:
        """Raises ValueError unless the cached latents have the shape the model expects."""
        if self.latent_shape != tuple(expected):
            raise ValueError(
                f"latent cache {self.directory} holds latents of shape {self.latent_shape}, "
                f"but the config expects {tuple(expected)}: config.data.image_size and "
                f"config.autoencoder.model must be those the cache was encoded with (see its "
                f"{METADATA_FILE}), or re-create the cache with this config"
            )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._records[index])

    def __repr__(self) -> str:
        return (
            f"LatentCacheSource({self.directory!r}, num_records={len(self)}, "
            f"latent_shape={self.latent_shape})"
        )
