"""libtpu stays out of processes on machines without a TPU; TPU VMs and users' choices win."""

import importlib.util
import os
import subprocess
import sys

import pytest

from ldm_jax.parallel import platforms
from tests.conftest import ROOT, TEST_XLA_FLAGS


@pytest.mark.parametrize(
    "environ, libtpu, chips, gpu, expected",
    [
        ({}, True, 0, False, "cpu"),  # libtpu installed, nothing attached: CPU only
        ({}, True, 4, False, None),  # a TPU VM: JAX's own choice (the TPU)
        ({}, True, 0, True, None),  # a GPU machine: JAX's own choice
        ({}, False, 0, False, None),  # no libtpu: nothing to skip
        ({"JAX_PLATFORMS": "tpu"}, True, 0, False, None),  # the user's choice
        ({"JAX_PLATFORMS": ""}, True, 0, False, None),
        ({"JAX_FORCE_TPU_INIT": "1"}, True, 0, False, None),
    ],
)
def test_cpu_only_where_libtpu_would_probe_for_nothing(environ, libtpu, chips, gpu, expected):
    got = platforms.cpu_only_platforms(
        environ, libtpu_installed=libtpu, tpu_chips=chips, gpu_visible=gpu
    )
    assert got == expected


def test_skip_absent_tpu_sets_the_variable_for_child_processes(monkeypatch):
    monkeypatch.setattr(platforms, "_attached_accelerators", lambda: (0, False))
    environ = {}
    limited = platforms.skip_absent_tpu(environ)
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    assert limited == has_libtpu
    assert environ == ({"JAX_PLATFORMS": "cpu"} if has_libtpu else {})
    # A value the user set is never replaced.
    environ = {"JAX_PLATFORMS": "cpu,tpu"}
    assert not platforms.skip_absent_tpu(environ)
    assert environ == {"JAX_PLATFORMS": "cpu,tpu"}


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the test extra has it)"
)
def test_a_command_on_a_machine_without_tpu_prints_no_libtpu_discovery_errors(tmp_path):
    """`ldm-jax evaluate` starts the backends (it joins the job's processes) before it finds
    that the workdir has no run; libtpu, if loaded, would print its discovery errors first.
    ALLOW_MULTIPLE_LIBTPU_LOAD lets libtpu start even while another process of the suite
    holds its lockfile, so that a regression shows here."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(
        XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    )
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax", "evaluate", f"--workdir={tmp_path / 'none'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ldm-jax evaluate: error:"), result.stderr
    assert "config.json not found" in lines[-1]
    assert not [line for line in lines[:-1] if "TPU" in line or "libtpu" in line], result.stderr
