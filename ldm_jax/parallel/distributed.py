"""Joining the processes of one job into one JAX runtime (``jax.distributed``).

A job's processes are described either explicitly, by a coordinator address, a process count
and this process's index (flags, or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID`` environment variables), or by the platform: a Cloud TPU VM slice, a
GKE TPU pod or a SLURM step of several tasks, which JAX reads itself. Without either there is
one process and nothing to initialise.

Joining fails in bounded time with one line: a coordinator port already in use is found
before JAX tries to bind it, and a peer that never joins ends the wait after
``initialization_timeout`` seconds (JAX's own timeout aborts the process from C++ with a
stack trace, so a watchdog exits first, cleanly).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import jax
import numpy as np

from ldm_jax.parallel import peers

ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# The variables by which JAX recognises a SLURM step (jax._src.clusters.slurm_cluster).
_SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
# GKE TPU pods name their peers; on a TPU VM the chips are device files.
_TPU_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")
# JAX's own timeout must not fire before the watchdog's.
_JAX_TIMEOUT_MARGIN_SECONDS = 30
# Seconds without a heartbeat after which the coordinator declares a process dead and every
# other process stops (jax's default is 100 s). Heartbeats come from a C++ thread, so a long
# compilation or a slow step does not miss them.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How this process joins its job.

    Attributes:
      coordinator_address: ``host:port`` of process 0's coordinator; None: not given.
      num_processes: Processes in the job; None: not given.
      process_id: This process's index in ``[0, num_processes)``; None: not given.
      devices_per_process: Simulated CPU devices of this process (``jax_num_cpu_devices``);
        None: the platform's devices.
      initialization_timeout: Seconds to wait for every process to join.
      heartbeat_timeout: Seconds without a heartbeat after which a process counts as dead
        and the others stop.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    devices_per_process: int | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None


def options_from(
    *,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    devices_per_process: int | None,
    initialization_timeout: int,
    environ: Mapping[str, str],
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
) -> DistributedOptions:
    """Flag values where given, else the ``JAX_*`` environment variables; checked.

    Raises:
      ValueError: naming the flag to fix when the description is incomplete or inconsistent.
    """

    def from_env(value, name: str, convert):
        if value is not None or not environ.get(name):
            return value
        try:
            return convert(environ[name])
        except ValueError:
            raise ValueError(f"{name}={environ[name]!r} is not a {convert.__name__}") from None

    options = DistributedOptions(
        coordinator_address=from_env(coordinator_address, ENV_COORDINATOR_ADDRESS, str),
        num_processes=from_env(num_processes, ENV_NUM_PROCESSES, int),
        process_id=from_env(process_id, ENV_PROCESS_ID, int),
        devices_per_process=devices_per_process,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout=heartbeat_timeout,
    )
    _check(options)
    return options


def _check(options: DistributedOptions) -> None:
    given = {
        "--coordinator_address": options.coordinator_address,
        "--num_processes": options.num_processes,
        "--process_id": options.process_id,
    }
    if any(v is not None for v in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} missing: a multi-process run needs --coordinator_address, "
                "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        _split_address(options.coordinator_address)
        if options.num_processes < 1:
            raise ValueError(f"--num_processes={options.num_processes} must be at least 1")
        if not 0 <= options.process_id < options.num_processes:
            raise ValueError(
                f"--process_id={options.process_id} must be in [0, --num_processes="
                f"{options.num_processes})"
            )
    if options.devices_per_process is not None and options.devices_per_process < 1:
        raise ValueError(f"--devices_per_process={options.devices_per_process} must be at least 1")
    for flag, seconds in (
        ("--initialization_timeout", options.initialization_timeout),
        ("--heartbeat_timeout", options.heartbeat_timeout),
    ):
        if seconds < 1:
            raise ValueError(f"{flag}={seconds} must be at least 1 s")


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator_address={address!r} must be host:port, e.g. 127.0.0.1:12355"
        )
    return host, int(port)


def detect_platform(environ: Mapping[str, str]) -> str | None:
    """``"slurm"`` or ``"tpu"`` when the platform describes the job's processes, else None."""
    if all(name in environ for name in _SLURM_VARIABLES):
        return "slurm"
    if any(environ.get(name) for name in _TPU_VARIABLES) or any(
        os.path.exists(path) for path in _TPU_DEVICE_FILES
    ):
        return "tpu"
    return None


def check_port_free(port: int) -> None:
    """Raises a one-line ValueError when ``port`` is taken (the coordinator binds every
    interface, so that is what is tried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            raise ValueError(
                f"coordinator port {port} is already in use; choose another port in "
                "--coordinator_address (or JAX_COORDINATOR_ADDRESS)"
            ) from None


@contextmanager
def _exit_after(seconds: float, message: str) -> Iterator[None]:
    """Ends the process with ``message`` unless the block finishes within ``seconds``.

    The wait for peers happens in C++ with the GIL released, so a Python thread can still
    act; JAX's own timeout would abort the process with a stack trace instead.
    """
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watch, name="distributed-init-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def initialize(options: DistributedOptions, environ: Mapping[str, str]) -> bool:
    """Sets the simulated device count and joins the job's runtime when there is a job.

    Must run before anything touches a JAX backend.

    Returns:
      True when ``jax.distributed`` was initialised (several processes, or a platform job).
    """
    if options.devices_per_process is not None:
        jax.config.update("jax_num_cpu_devices", options.devices_per_process)
    platform = None if options.explicit else detect_platform(environ)
    if not options.explicit and platform is None:
        return False
    timeout = options.initialization_timeout
    if options.explicit:
        where = f"the coordinator at {options.coordinator_address}"
        _, port = _split_address(options.coordinator_address)
        if options.process_id == 0:
            check_port_free(port)
        arguments = dict(
            coordinator_address=options.coordinator_address,
            num_processes=options.num_processes,
            process_id=options.process_id,
        )
        who = f"process {options.process_id} of {options.num_processes}"
    else:
        where, arguments, who = f"the {platform} job's coordinator", {}, "this process"
    message = (
        f"not every process joined {where} within {timeout} s ({who} waited); start all of "
        "them with the same --coordinator_address and --num_processes, or raise "
        "--initialization_timeout"
    )
    with _exit_after(timeout, message):
        jax.distributed.initialize(
            **arguments,
            initialization_timeout=timeout + _JAX_TIMEOUT_MARGIN_SECONDS,
            heartbeat_timeout_seconds=options.heartbeat_timeout,
        )
        if options.explicit:
            host, _ = _split_address(options.coordinator_address)
            peers.watch(options.process_id, options.num_processes, host)
    return True


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
