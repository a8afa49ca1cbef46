"""Two processes x 4 devices, stopped, resumed as 1 process x 2 devices: one loss curve.

The global batches do not depend on the process count (``ldm_jax.data.process_blocks``) and
initial values do not depend on the mesh (``state.init_key``), so the interrupted run's
per-step losses, on 2 processes and then on 1, match those of a run that never stopped, up
to the order of floating-point reductions over 8 or 2 devices.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TEST_XLA_FLAGS, run_cli

STEPS = 6
TRAIN = [
    "train",
    "--config=configs/quickstart.py:tiny",
    "--config.stage=autoencoder",
    f"--config.autoencoder.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=100",  # only the stop and the end write checkpoints
]


def _losses(workdir):
    """Per-step losses; a step logged twice (before a stop and after resuming) keeps its last."""
    losses = {}
    if (workdir / "metrics.jsonl").exists():
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_on_one_continue_the_same_curve(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = run_cli(*TRAIN, f"--workdir={straight}")
    assert result.returncode == 0, result.stderr

    launcher = subprocess.Popen(
        [sys.executable, "-m", "ldm_jax.cli", "launch", "local", "--num_processes=2",
         "--devices_per_process=4", "--", *TRAIN, f"--workdir={interrupted}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS},
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while 2 not in _losses(interrupted) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the 2-process run made no progress"
        time.sleep(0.5)
    # Preemption: the launcher forwards SIGTERM; both processes stop at one step and save it.
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert "[0] " in output and "[1] " in output
    assert "over 8 devices in 2 processes" in output
    stopped_at = max(_losses(interrupted))
    assert 2 <= stopped_at < STEPS, output
    checkpoints = sorted(int(p.name) for p in (interrupted / "checkpoints/autoencoder").iterdir())
    assert checkpoints == [stopped_at]

    result = run_cli(*TRAIN, f"--workdir={interrupted}")
    assert result.returncode == 0, result.stderr
    assert "over 2 devices in 1 processes" in result.stderr
    assert f"restored step {stopped_at}" in result.stderr
    assert "data iterator of step" in result.stderr and "from 2 to 1 processes" in result.stderr

    expected, resumed = _losses(straight), _losses(interrupted)
    assert sorted(resumed) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-6), step
