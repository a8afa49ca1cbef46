"""Joining a job's processes: flags and environment, platform detection, bounded failures."""

import socket
import time

import pytest
from conftest import run_cli

from ldm_jax.parallel import distributed

TINY = "--config=configs/quickstart.py:tiny"


def _options(environ=None, **flags):
    values = dict(
        coordinator_address=None,
        num_processes=None,
        process_id=None,
        devices_per_process=None,
        initialization_timeout=300,
    )
    return distributed.options_from(**{**values, **flags}, environ=environ or {})


def test_no_description_is_one_process():
    options = _options()
    assert not options.explicit
    assert not distributed.initialize(options, {})


def test_environment_fills_what_flags_leave_out():
    environ = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    options = _options(environ, process_id=2)
    assert options.coordinator_address == "10.0.0.1:1234"
    assert options.num_processes == 4
    assert options.process_id == 2  # the flag wins


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (dict(coordinator_address="127.0.0.1:1234"), "--num_processes, --process_id missing"),
        (dict(coordinator_address="nohost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2"),
        (dict(devices_per_process=0), "--devices_per_process=0"),
        (dict(initialization_timeout=0), "--initialization_timeout=0"),
    ],
)
def test_bad_descriptions_name_the_flag(flags, fragment):
    with pytest.raises(ValueError, match=fragment):
        _options(**flags)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        _options({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})


def test_platform_detection():
    slurm = dict.fromkeys(
        ["SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"],
        "1",
    )
    assert distributed.detect_platform(slurm) == "slurm"
    assert distributed.detect_platform({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.detect_platform({"SLURM_JOB_ID": "1"}) is None  # salloc shell, no step


def _listening_socket():
    sock = socket.socket()
    sock.bind(("", 0))
    sock.listen()
    return sock


def test_port_in_use_is_one_line():
    with _listening_socket() as sock:
        port = sock.getsockname()[1]
        with pytest.raises(ValueError, match=f"coordinator port {port} is already in use"):
            distributed.check_port_free(port)
        result = run_cli(
            "train",
            TINY,
            "--workdir=/nonexistent",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            "--process_id=0",
            timeout=120,
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert f"coordinator port {port} is already in use" in result.stderr.splitlines()[-1]


def test_peer_that_never_joins_ends_in_bounded_time(tmp_path):
    with _listening_socket() as sock:
        port = sock.getsockname()[1]  # free once closed: nobody coordinates there
    start = time.monotonic()
    result = run_cli(
        "train",
        TINY,
        f"--workdir={tmp_path}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=1",
        "--initialization_timeout=3",
        timeout=120,
    )
    assert time.monotonic() - start < 60
    assert result.returncode == 2
    assert "Check failure" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "not every process joined the coordinator" in last
    assert "--initialization_timeout" in last
