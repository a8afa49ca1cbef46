"""``ldm-jax launch local``: several processes of one job on this machine, on 127.0.0.1.

Each child runs the same ldm-jax command with its process index; their output is streamed
line by line, prefixed ``[i]``. The launch fails fast: when a child exits non-zero the others
get SIGTERM, then SIGKILL after a grace period (a peer blocked in a collective with a dead
process never finishes its step), and the launcher exits non-zero naming the child.
SIGINT and SIGTERM to the launcher are forwarded to every child, so a preempted job
checkpoints on all processes and stops. The children watch each other too
(``parallel/peers.py``): one that dies takes the others down within a second, with exit
code 2, and the launcher names the one that died.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

_POLL_SECONDS = 0.1
# What runs an ldm-jax command: this interpreter, so a virtualenv's install is the one used.
LDM_JAX = (sys.executable, "-m", "ldm_jax")


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def child_commands(
    command: Sequence[str],
    *,
    address: str,
    num_processes: int,
    devices_per_process: int | None,
    program: Sequence[str] = LDM_JAX,
) -> list[list[str]]:
    """The argv of every child: ``ldm-jax COMMAND`` plus where it stands in the job."""
    devices = (
        [] if devices_per_process is None else [f"--devices_per_process={devices_per_process}"]
    )
    return [
        [
            *program,
            *command,
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
            *devices,
        ]
        for index in range(num_processes)
    ]


class _Children:
    """The running children, each in its own session so a signal reaches its whole group
    (grain workers included), and the threads that copy their output."""

    def __init__(self, commands: Sequence[Sequence[str]], out: TextIO):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._lock = threading.Lock()
        self.processes = [
            subprocess.Popen(
                list(c),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )
            for c in commands
        ]
        self._pumps = [
            threading.Thread(target=self._pump, args=(i, p.stdout, out), daemon=True)
            for i, p in enumerate(self.processes)
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, index: int, stream: TextIO, out: TextIO) -> None:
        for line in stream:
            with self._lock:
                # A last line without its newline (a progress bar) still ends the line.
                out.write(f"[{index}] {line}" if line.endswith("\n") else f"[{index}] {line}\n")
                out.flush()

    def signal(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:  # exited since poll()
                    pass

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM, then SIGKILL to those still running after ``grace_seconds``."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(_POLL_SECONDS)
        self.signal(signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def join_output(self) -> None:
        for pump in self._pumps:
            pump.join()


def _describe(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def launch_local(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int | None = None,
    grace_seconds: float = 10.0,
    dry_run: bool = False,
    out: TextIO | None = None,
    program: Sequence[str] = LDM_JAX,
) -> int:
    """Runs ``ldm-jax COMMAND`` as ``num_processes`` processes of one job; returns the exit
    code (0 when every child succeeded, else the first failing child's). ``program`` is
    what runs the command in each child; ``out`` receives the output (default: stdout).

    Raises:
      ValueError: for a process or device count below 1.
    """
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be at least 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices_per_process={devices_per_process} must be at least 1")
    out = out or sys.stdout
    address = f"127.0.0.1:{free_port()}"
    commands = child_commands(
        command,
        address=address,
        num_processes=num_processes,
        devices_per_process=devices_per_process,
        program=program,
    )
    if dry_run:
        out.write("".join(f"{shlex.join(c)} &\n" for c in commands) + "wait\n")
        return 0
    print(
        f"ldm-jax launch: {num_processes} processes, coordinator {address}",
        file=sys.stderr,
        flush=True,
    )
    children = _Children(commands, out)
    forward = lambda signum, _frame: children.signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in children.processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # A child killed by a signal is the cause; the peers it took down exit with 2.
                index, code = min(failed, key=lambda failure: (failure[1] > 0, failure[0]))
                children.stop(grace_seconds)
                children.join_output()
                print(
                    f"ldm-jax launch: error: process {index} {_describe(code)}; stopped the "
                    "other processes",
                    file=sys.stderr,
                )
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                children.join_output()
                return 0
            time.sleep(_POLL_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
