"""A Cloud Storage emulator on loopback for the tests of workdirs and data in buckets.

``emulated_bucket`` starts ``gcp-storage-emulator`` (in memory) on a free port with one
bucket, points this process's clients at it (``STORAGE_EMULATOR_HOST``, and TensorStore's
endpoint through ``storage.configure_emulators``; the CLI subprocesses inherit both), and stops
it afterwards.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

from ldm_jax import storage

START_SECONDS = 30


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(port: int, emulator: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if emulator.poll() is not None:
            pytest.fail(f"the GCS emulator exited: {log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the GCS emulator did not listen within {START_SECONDS}s")


@contextlib.contextmanager
def emulated_bucket(tmp_dir):
    """Yields the ``gs://`` URL of a bucket in a fresh emulator; remote files that readers
    need locally are cached under ``tmp_dir`` (``XDG_CACHE_HOME``)."""
    port = _free_port()
    # A bucket name of its own: epath keeps one gcsfs instance, and its listings, per process.
    name = f"ldm-jax-test-{port}"
    log_path = tmp_dir / "emulator.log"
    with log_path.open("w") as log:
        emulator = subprocess.Popen(
            [
                *(sys.executable, "-m", "gcp_storage_emulator", "start", "--in-memory"),
                *("--host=127.0.0.1", f"--port={port}", f"--default-bucket={name}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_listening(port, emulator, log_path)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(storage.GCS_EMULATOR_VARIABLE, f"http://127.0.0.1:{port}")
            patch.delenv(storage.TENSORSTORE_GCS_VARIABLE, raising=False)  # restored after
            patch.setenv("XDG_CACHE_HOME", os.fspath(tmp_dir / "cache"))
            storage.configure_emulators()
            yield f"gs://{name}"
    finally:
        emulator.terminate()
        emulator.wait(timeout=10)
