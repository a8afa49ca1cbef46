"""Paths on a local disk or in a bucket (``gs://``, ``s3://``): the one place that knows the
difference.

Every workdir and data path goes through ``etils.epath`` (what orbax and grain use too), whose
``gs://`` and ``s3://`` paths are served by ``gcsfs`` and ``s3fs``; checkpoints go from orbax
through TensorStore straight to the bucket. What a bucket cannot do as a disk does is done
here: a write probe instead of ``mkdir`` and free space, whole-object writes, and local copies
for the readers that open files by name in C++ or Rust (ArrayRecord shards, tokenizer and
transformers folders).

Emulators (for tests, and to try a pod's set-up on one machine): ``STORAGE_EMULATOR_HOST``
points the GCS clients at a local server (gcsfs and google-cloud-storage read it;
TensorStore's ``TENSORSTORE_GCS_HTTP_URL`` is set from it here), ``AWS_ENDPOINT_URL`` the S3
ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")
GCS_EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
TENSORSTORE_GCS_VARIABLE = "TENSORSTORE_GCS_HTTP_URL"
S3_ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL"


def is_remote(path: Any) -> bool:
    """Whether ``path`` is in a bucket (``gs://``, ``s3://``) rather than on a local disk."""
    return str(path).startswith(REMOTE_SCHEMES)


# The filesystem package serving each bucket scheme, and how to install it.
_CLIENTS = {
    "gs://": ("gcsfs", "pip install 'ldm_jax[cloud]'"),
    "s3://": ("s3fs", "pip install s3fs"),
}


def as_path(path: Any) -> epath.Path:
    """An ``epath.Path`` of a local path (made absolute) or a bucket URL.

    Raises:
      OSError: one line naming the package to install for a bucket scheme without it.
    """
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(os.path.abspath(text))
    client, install = _CLIENTS[text[:5]]
    if importlib.util.find_spec(client) is None:
        raise OSError(f"{text} is in a bucket, which needs the {client} package: {install}")
    return epath.Path(text)


def join(base: Any, *parts: str) -> str:
    """``base/parts...`` as a string, for a local path or a bucket URL alike."""
    return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts)) if parts else os.fspath(base)


def configure_emulators(environ: dict[str, str] | None = None) -> None:
    """Points TensorStore at the GCS emulator that ``STORAGE_EMULATOR_HOST`` names (gcsfs and
    google-cloud-storage read that variable themselves; TensorStore has its own)."""
    environ = os.environ if environ is None else environ
    emulator = environ.get(GCS_EMULATOR_VARIABLE)
    if not emulator:
        return
    if TENSORSTORE_GCS_VARIABLE not in environ:
        environ[TENSORSTORE_GCS_VARIABLE] = emulator if "://" in emulator else f"http://{emulator}"
    # An emulator takes no credentials: gcsfs would warn at every call that it found none.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)


def check_writable(directory: Any, flag: str) -> None:
    """Creates ``directory`` (a bucket prefix needs no creating) and writes and removes a probe
    object in it.

    Raises:
      OSError: one line naming ``flag`` when it cannot be written (a missing bucket, no
        permission, a file in the way).
    """
    path = as_path(directory)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as error:  # noqa: BLE001 - each backend raises its own kinds
        reason = " ".join(str(getattr(error, "strerror", None) or error).split())
        raise OSError(
            f"{flag}={directory} is not a writable directory or bucket "
            f"({reason or type(error).__name__}); choose another {flag}"
        ) from None


def free_bytes(directory: Any) -> int | None:
    """Free bytes on the disk of a local ``directory``; None in a bucket (no such limit)."""
    if is_remote(directory):
        return None
    return shutil.disk_usage(as_path(directory)).free


def local_copy(path: Any) -> str:
    """A local file or folder with the contents of ``path``: ``path`` itself when local, else a
    copy in this user's cache (``$XDG_CACHE_HOME/ldm_jax/remote``), fetched again when the
    object's size changed. For readers that open files by name outside Python."""
    if not is_remote(path):
        return os.fspath(path)
    source = as_path(path)
    digest = hashlib.sha1(os.fspath(source).encode()).hexdigest()[:16]
    target = epath.Path(_cache_root()) / digest / source.name
    if source.is_dir():
        for child in _walk_files(source):
            _fetch(child, target / child.relative_to(source))
    else:
        _fetch(source, target)
    return os.fspath(target)


def _cache_root() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ldm_jax", "remote")


def _walk_files(directory: epath.Path) -> Iterator[epath.Path]:
    for child in directory.iterdir():
        if child.is_dir():
            yield from _walk_files(child)
        else:
            yield child


def _fetch(source: epath.Path, target: epath.Path) -> None:
    size = source.stat().length
    if target.exists() and target.stat().length == size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        partial.write(source.read_bytes())
    os.replace(partial.name, target)


def upload(local: Any, remote: Any) -> None:
    """Copies a local file or folder (recursively) to ``remote``."""
    source, target = epath.Path(os.fspath(local)), as_path(remote)
    if source.is_dir():
        for child in _walk_files(source):
            upload(child, target / child.relative_to(source))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


class _ObjectAppender:
    """A bucket object appended to: objects cannot be appended in place, so the whole content
    is kept in memory and written again at every ``flush`` (fine for logs of a few MB). It has
    no ``fileno``: there is no local file to sync."""

    def __init__(self, path: epath.Path):
        self._path = path
        self._content = bytearray(path.read_bytes() if path.exists() else b"")
        self.closed = False

    def write(self, data: bytes) -> int:
        self._content += data
        return len(data)

    def flush(self) -> None:
        if not self.closed:
            self._path.write_bytes(bytes(self._content))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


def open_for_append(path: Any):
    """A binary file appended to, on a disk or in a bucket (see ``_ObjectAppender``): each
    ``flush`` makes what was written so far visible."""
    if is_remote(path):
        return _ObjectAppender(as_path(path))
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return open(target, "ab")  # noqa: SIM115 - the caller closes it


class _TensorBoardObjects:
    """tensorboardX's writer factory for bucket URLs: event files as appended objects, where
    its own GCS writer needs credentials of its own and a real endpoint."""

    @staticmethod
    def directory_check(path: str) -> None:
        del path  # a bucket prefix needs no creating

    @staticmethod
    def open(path: str):
        return _ObjectAppender(as_path(path))


def register_tensorboard_writers() -> None:
    """Lets tensorboardX write event files to every bucket scheme through ``etils.epath``."""
    from tensorboardX import record_writer

    for scheme in REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _TensorBoardObjects)


def write_bytes(path: Any, data: bytes) -> None:
    """Writes a whole file or object, creating its folder on a disk. On a disk the file is
    written under a temporary name and renamed, so a reader never sees half of it (an object
    in a bucket appears whole anyway)."""
    target = as_path(path)
    if is_remote(target):
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.tmp"
    partial.write_bytes(data)
    os.replace(partial, target)


def write_text(path: Any, text: str) -> None:
    """``write_bytes`` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_png(path: Any, image) -> None:
    """A uint8 (H, W, 3) image as a PNG file or object."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())
