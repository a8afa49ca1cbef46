"""A job whose process dies or hangs ends in bounded time with an error naming it; a busy
coordinator port is one line naming the port and the flag.

Two real `ldm-jax train` processes on 127.0.0.1 (2 simulated CPU devices each) train stage 1
of the tiny quickstart config for many steps; once both take part in steps, one is killed
(or stopped) and the other must exit on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TEST_XLA_FLAGS, run_cli

from ldm_jax.parallel import distributed

TINY = "--config=configs/quickstart.py:tiny"
TRAIN = [
    "train",
    TINY,
    "--config.stage=autoencoder",
    "--config.autoencoder.train.steps=100000",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=100000",
]
# Start-up (imports, compiling the step) on a loaded 2-core machine.
START_SECONDS = 300
# A dead peer closes its connections at once: the survivor stops within about a second.
DEAD_PEER_SECONDS = 30
HEARTBEAT_SECONDS = 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _env(devices: int | None = 2) -> dict[str, str]:
    flags = TEST_XLA_FLAGS + (
        f" --xla_force_host_platform_device_count={devices}" if devices else ""
    )
    # CPU only: no accelerator plugin probing its hardware and logging about it.
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def _processes(commands: list[list[str]], logs: list[pathlib.Path], env: dict[str, str]):
    """Starts ``commands`` (output to ``logs``); kills whichever still run at the end."""
    started = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with open(log, "w") as out:
                started.append(
                    subprocess.Popen(
                        command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                )
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_until_training(workdir: pathlib.Path, processes: list[subprocess.Popen]) -> None:
    """Until step 2 is logged: every process has then taken part in two steps' collectives."""
    deadline = time.monotonic() + START_SECONDS
    metrics = workdir / "metrics.jsonl"
    while True:
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
            if steps and max(steps) >= 2:
                return
        codes = [p.poll() for p in processes]
        assert all(code is None for code in codes), f"a process exited early: {codes}"
        assert time.monotonic() < deadline, "the 2-process run did not start training"
        time.sleep(0.2)


def _wait(process: subprocess.Popen, seconds: float) -> tuple[int, float]:
    """(exit code, seconds it took); fails if ``process`` still runs after ``seconds``."""
    start = time.monotonic()
    try:
        code = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds} s after its peer died: it hangs")
    return code, time.monotonic() - start


def _last_line(log: pathlib.Path) -> str:
    return [line for line in log.read_text().splitlines() if line.strip()][-1]


def _two_trainers(tmp_path: pathlib.Path, *extra: str):
    workdir, port = tmp_path / "run", _free_port()
    commands = [
        [
            sys.executable,
            "-m",
            "ldm_jax.cli",
            *TRAIN,
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={index}",
            *extra,
        ]
        for index in range(2)
    ]
    logs = [tmp_path / f"process{index}.log" for index in range(2)]
    return workdir, commands, logs


def test_killed_process_stops_its_peer_with_one_line(tmp_path):
    workdir, commands, logs = _two_trainers(tmp_path)
    with _processes(commands, logs, _env()) as (first, second):
        _wait_until_training(workdir, [first, second])
        second.send_signal(signal.SIGKILL)
        code, seconds = _wait(first, DEAD_PEER_SECONDS)
    output = logs[0].read_text()
    assert code == 2, output[-3000:]
    assert seconds < DEAD_PEER_SECONDS
    assert "Traceback" not in output and "Check failure" not in output, output[-3000:]
    assert _last_line(logs[0]) == (
        "ldm-jax: error: process 1 of 2 left the job without finishing (it failed or was "
        "killed; see its output); stopping process 0 too"
    )


def test_hung_process_ends_its_peer_after_the_heartbeat_timeout(tmp_path):
    """A stopped process keeps its connections open: the heartbeat finds it, after
    ``--heartbeat_timeout`` seconds rather than jax's default of 100."""
    workdir, commands, logs = _two_trainers(tmp_path, f"--heartbeat_timeout={HEARTBEAT_SECONDS}")
    with _processes(commands, logs, _env()) as (first, second):
        _wait_until_training(workdir, [first, second])
        second.send_signal(signal.SIGSTOP)
        code, seconds = _wait(first, 6 * HEARTBEAT_SECONDS)
    output = logs[0].read_text()
    assert code != 0
    assert seconds < 6 * HEARTBEAT_SECONDS
    # jax ends the process from C++; its message names the process that went silent.
    assert "The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in output


def _children_of_launch(workdir: pathlib.Path) -> dict[int, int]:
    """{process index: pid} of the running `ldm-jax train` children writing ``workdir``."""
    children = {}
    for proc in pathlib.Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        indices = [a.split("=")[1] for a in argv if a.startswith("--process_id=")]
        if f"--workdir={workdir}" in argv and indices:  # not the launcher, which has none
            children[int(indices[0])] = int(proc.name)
    return children


def test_launcher_names_the_dead_process_and_stops_the_other(tmp_path):
    """The coordinator (process 0) dies: process 1 stops on its own, and the launcher exits
    non-zero naming process 0."""
    workdir = tmp_path / "run"
    launch = [
        sys.executable,
        "-m",
        "ldm_jax.cli",
        "launch",
        "local",
        "--num_processes=2",
        "--devices_per_process=2",
        "--",
        *TRAIN,
        f"--workdir={workdir}",
    ]
    log = tmp_path / "launch.log"
    with _processes([launch], [log], _env(devices=None)) as (launcher,):
        children = {}
        deadline = time.monotonic() + START_SECONDS
        while len(children) < 2:
            assert time.monotonic() < deadline, "the launcher started no children"
            children = _children_of_launch(workdir)
            time.sleep(0.2)
        _wait_until_training(workdir, [launcher])
        os.kill(children[0], signal.SIGKILL)
        code, seconds = _wait(launcher, DEAD_PEER_SECONDS)
    output = log.read_text()
    assert code == 128 + signal.SIGKILL, output[-3000:]
    assert seconds < DEAD_PEER_SECONDS
    assert "Traceback" not in output, output[-3000:]
    assert "[1] ldm-jax: error: lost process 0 of 2, the coordinator" in output
    assert _last_line(log) == (
        "ldm-jax launch: error: process 0 was killed by SIGKILL; stopped the other processes"
    )


def test_coordinator_port_in_use_is_one_line_naming_port_and_flag(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        result = run_cli(
            *TRAIN,
            f"--workdir={tmp_path}",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            "--process_id=0",
            timeout=120,
        )
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == (
        f"ldm-jax train: error: coordinator port {port} is already in use; choose another "
        "port in --coordinator_address (or JAX_COORDINATOR_ADDRESS)"
    )
    assert not (tmp_path / "config.json").exists()  # nothing ran


def test_heartbeat_timeout_below_one_second_names_the_flag():
    with pytest.raises(ValueError, match=r"--heartbeat_timeout=0 must be at least 1 s"):
        distributed.options_from(
            coordinator_address="127.0.0.1:1234",
            num_processes=2,
            process_id=0,
            devices_per_process=None,
            initialization_timeout=300,
            heartbeat_timeout=0,
            environ={},
        )
