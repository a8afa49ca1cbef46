"""Preemption, hard kills and exact resume, with real processes and real signals.

``ldm-jax train`` runs the quickstart's tiny autoencoder stage in a subprocess. SIGTERM (TPU
maintenance, SLURM preemption) must finish the step, save it, say where, and exit 0; SIGKILL
at any moment, also during a save, must cost nothing before the newest complete checkpoint.
Either way the restarted run ends bitwise equal to a run that was never interrupted, on 1
device, on a (2,2,2) mesh and across 2 processes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TEST_XLA_FLAGS, StopAtCall

from ldm_jax.checkpoint import read_arrays
from ldm_jax.train.run import train

STEPS = 30
TRAIN = [
    "train",
    "--config=configs/quickstart.py:tiny",
    "--config.stage=autoencoder",
    f"--config.autoencoder.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=4",
    "--config.train.max_to_keep=20",
]


def start(workdir, *extra, devices=1, launch=()):
    return subprocess.Popen(
        [sys.executable, "-m", "ldm_jax.cli", *launch, *TRAIN, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
        },
    )


def finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def wait_for_step(process, workdir, step, timeout=600):
    deadline = time.monotonic() + timeout
    while max(logged_steps(workdir), default=0) < step:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


def checkpoints(workdir):
    directory = workdir / "checkpoints" / "autoencoder"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def saved_state(workdir, step=STEPS):
    """The arrays of the state saved at ``step``, as host arrays, whatever mesh saved them."""
    return list(read_arrays(str(workdir / "checkpoints" / "autoencoder" / str(step))).values())


def assert_bitwise_equal(workdir_a, workdir_b):
    leaves_a, leaves_b = saved_state(workdir_a), saved_state(workdir_b)
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def losses(workdir):
    """Per-step losses; a step logged twice (before a kill and after the restart) keeps its
    last value."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run on 1 device."""
    workdir = tmp_path_factory.mktemp("straight")
    code, _, stderr = finish(start(workdir))
    assert code == 0, stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_sigterm_saves_the_step_says_where_and_exits_zero_then_resumes_exactly(straight, tmp_path):
    process = start(tmp_path)
    wait_for_step(process, tmp_path, 6)
    process.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    stopped_at = max(logged_steps(tmp_path))
    assert stopped_at < STEPS and checkpoints(tmp_path)[-1] == stopped_at
    directory = tmp_path / "checkpoints" / "autoencoder"
    assert f"stopped at step {stopped_at} on request; checkpoint of step {stopped_at} " in stderr
    assert f"saved in {directory}" in stderr and "run the same command to resume" in stdout

    code, _, stderr = finish(start(tmp_path))
    assert code == 0, stderr[-3000:]
    assert f"restored step {stopped_at}" in stderr
    assert_bitwise_equal(straight, tmp_path)
    assert losses(straight) == losses(tmp_path)


def half_written(directory):
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def kill_during_a_save(process, workdir, timeout=600):
    """SIGKILLs ``process`` while orbax writes a checkpoint (its temporary directory exists);
    returns whether the kill landed inside a save."""
    directory = workdir / "checkpoints" / "autoencoder"
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if directory.exists() and any(
            ".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()
        ):
            process.kill()
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    process.wait()
    return False


@pytest.mark.slow
def test_sigkill_mid_step_and_mid_save_loses_nothing_before_the_newest_checkpoint(
    straight, tmp_path
):
    # Mid-step: killed at an arbitrary step between checkpoints, once one is complete.
    process = start(tmp_path)
    wait_for_step(process, tmp_path, 6)
    deadline = time.monotonic() + 300
    while not checkpoints(tmp_path):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.kill()
    process.wait()
    newest = checkpoints(tmp_path)[-1]
    assert newest >= 4

    # Mid-save: the restarted run is killed while a checkpoint is being written. Should the
    # kill fall between saves, a half-written directory as orbax leaves it is planted.
    process = start(tmp_path)
    inside = kill_during_a_save(process, tmp_path)
    directory = tmp_path / "checkpoints" / "autoencoder"
    if not inside or not half_written(directory):
        newest = checkpoints(tmp_path)[-1]
        planted = directory / f"{newest + 4}.orbax-checkpoint-tmp-1796280000"
        shutil.copytree(directory / str(newest), planted)
        for item in ("state", "small_arrays"):  # the state half is missing
            shutil.rmtree(planted / item, ignore_errors=True)
    newest = checkpoints(tmp_path)[-1]

    code, _, stderr = finish(start(tmp_path))
    assert code == 0, stderr[-3000:]
    assert "ignoring 1 half-written checkpoint(s)" in stderr
    assert f"restored step {newest}" in stderr
    assert not half_written(directory)  # cleaned up
    assert_bitwise_equal(straight, tmp_path)
    assert losses(straight) == losses(tmp_path)


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_the_uninterrupted_two_process_run(tmp_path):
    launch = ("launch", "local", "--num_processes=2", "--devices_per_process=2", "--")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, _, stderr = finish(start(straight, launch=launch))
    assert code == 0, stderr[-3000:]

    process = start(interrupted, launch=launch)
    wait_for_step(process, interrupted, 6)
    process.send_signal(signal.SIGTERM)  # forwarded by the launcher to both processes
    code, _, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    assert checkpoints(interrupted)[-1] < STEPS

    code, _, stderr = finish(start(interrupted, launch=launch))
    assert code == 0, stderr[-3000:]
    assert_bitwise_equal(straight, interrupted)
    assert losses(straight) == losses(interrupted)


@pytest.mark.slow
def test_resume_on_a_2_2_2_mesh_is_bitwise_the_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config
    config.stage = "autoencoder"
    config.autoencoder.train.steps = 6
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.train.log_every = 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(config, str(straight))
    assert not train(config, str(resumed), should_stop=StopAtCall(3))
    assert train(config, str(resumed))
    for workdir in (straight, resumed):
        assert checkpoints(workdir)[-1] == 6
    leaves_a, leaves_b = saved_state(straight, 6), saved_state(resumed, 6)
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert losses(straight) == losses(resumed)
