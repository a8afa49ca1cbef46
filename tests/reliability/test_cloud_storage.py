"""Workdirs and data in a bucket, as a pod job keeps them: two processes train both stages
into ``gs://``, are stopped and resume exactly from the bucket's checkpoint, writing nothing
to the working directory; sampling, sweeps and export read and write the bucket; an image
folder and a latent cache in the bucket train; a bucket that cannot be written is one line.
All against a Cloud Storage emulator on loopback (``tests/gcs_emulator.py``)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TEST_XLA_FLAGS, run_cli
from gcs_emulator import emulated_bucket
from PIL import Image

from ldm_jax import storage

TINY = f"--config={ROOT}/configs/quickstart.py:tiny"
TRAIN = ["train", TINY, "--config.train.log_every=1", "--config.train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    with emulated_bucket(tmp_path_factory.mktemp("emulator")) as url:
        yield url


def _cli(*args, cwd, devices: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    """``ldm-jax ARGS`` run from ``cwd`` (the emulator's variables are inherited)."""
    return subprocess.run(
        [sys.executable, "-m", "ldm_jax.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            **os.environ,
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
        },
    )


def _launch_two_processes(workdir: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "ldm_jax.cli", "launch", "local"),
            *("--num_processes=2", "--devices_per_process=4", "--"),
            *TRAIN,
            f"--workdir={workdir}",
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS},
    )


def _losses(workdir) -> dict[tuple[str, int], float]:
    """Per (stage, step) losses of a workdir on a disk or in a bucket; a step logged twice
    (before a stop and after resuming) keeps its last."""
    metrics = storage.as_path(workdir) / "metrics.jsonl"
    losses = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            losses[(record["stage"], record["step"])] = record["loss"]
    return losses


@pytest.fixture(scope="module")
def bucket_run(bucket, tmp_path_factory):
    """The tiny quickstart trained by 2 processes x 4 devices into the bucket: stopped with
    SIGTERM in stage 2, then resumed by the same command; and the same config trained
    without a stop on a local disk, for reference."""
    cwd = tmp_path_factory.mktemp("working_directory")
    straight = tmp_path_factory.mktemp("straight")
    result = run_cli(*TRAIN, f"--workdir={straight}")
    assert result.returncode == 0, result.stderr
    workdir = f"{bucket}/run"
    launcher = _launch_two_processes(workdir, cwd)
    deadline = time.monotonic() + 900
    while ("diffusion", 2) not in _losses(workdir) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the 2-process run made no progress"
        time.sleep(1)
    launcher.send_signal(signal.SIGTERM)  # forwarded to both processes
    stopped, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stopped
    resumed = _launch_two_processes(workdir, cwd)
    finished, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, finished
    return dict(workdir=workdir, cwd=cwd, straight=straight, stopped=stopped, finished=finished)


@pytest.mark.slow
def test_two_processes_train_into_a_bucket_and_resume_exactly(bucket_run):
    workdir, stopped, finished = (bucket_run[k] for k in ("workdir", "stopped", "finished"))
    assert "over 8 devices in 2 processes" in stopped
    assert "stopped at step" in stopped and "diffusion" in stopped
    assert "restored step" in finished
    expected, resumed = _losses(bucket_run["straight"]), _losses(workdir)
    assert sorted(resumed) == sorted(expected)
    assert {stage for stage, _ in resumed} == {"autoencoder", "diffusion"}
    for key in expected:
        assert resumed[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    run = storage.as_path(workdir)
    for name in ("config.json", "tokenizer.json", "latent_scale.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "samples" / "diffusion_000004.png").is_file()
    assert list((run / "tensorboard" / "diffusion").iterdir())
    checkpoints = run / "checkpoints" / "diffusion"
    steps = sorted(int(p.name) for p in checkpoints.iterdir())
    assert steps[-1] == 4
    assert all((checkpoints / str(step) / "commit_success.txt").exists() for step in steps)
    # Nothing of the run landed in the working directory (no local "gs:" folder).
    assert list(bucket_run["cwd"].iterdir()) == []


@pytest.mark.slow
def test_sample_sweep_and_export_read_and_write_the_bucket(bucket_run):
    workdir, cwd = bucket_run["workdir"], bucket_run["cwd"]
    grid = f"{workdir}/out/grid.png"
    result = _cli("sample", f"--workdir={workdir}", "--prompt=a red circle", "--steps=2",
                  "--num_per_prompt=2", f"--out={grid}", cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with storage.as_path(grid).open("rb") as f:
        assert np.asarray(Image.open(f)).shape == (36, 70, 3)  # 2 images of 32x32, 2px gaps
    result = _cli("evaluate", f"--workdir={workdir}", "--sweep=steps=2,3", "--num_per_prompt=1",
                  cwd=cwd, devices=8)  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = storage.as_path(workdir) / "evaluate" / "sweep-steps"
    assert len(json.loads((sweep / "results.json").read_text())["rows"]) == 2
    assert (sweep / "plot-shape_accuracy.png").is_file()
    result = _cli("export", f"--workdir={workdir}", "--to=diffusers", f"--out={workdir}/exported",
                  cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    exported = storage.as_path(workdir) / "exported"
    for name in ("model_index.json", "unet/config.json", "vae/config.json"):
        assert (exported / name).is_file(), name
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_an_image_folder_and_a_latent_cache_in_the_bucket_train(bucket, tmp_path):
    images = storage.as_path(f"{bucket}/images")
    rng = np.random.default_rng(0)
    for i in range(16):
        folder = images / f"class_{i % 2}"
        storage.write_png(folder / f"{i}.png", rng.integers(0, 255, (32, 32, 3), np.uint8))
        (folder / f"{i}.txt").write_text("a red circle" if i % 2 else "a blue square")
    workdir, cache = f"{bucket}/folder_run", f"{bucket}/folder_run_latents"
    data = ["--config.data.source=image_folder", f"--config.data.path={images}"]
    result = _cli(*TRAIN, f"--workdir={workdir}", *data, "--config.stage=autoencoder", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = _cli("cache-latents", f"--workdir={workdir}", f"--out={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 16 latents" in result.stdout
    result = _cli(*TRAIN, f"--workdir={workdir}", *data, "--config.stage=diffusion",
                  f"--config.data.latent_cache={cache}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ("diffusion", 4) in _losses(workdir)


def test_a_bucket_that_does_not_exist_is_one_line_naming_the_workdir(bucket, tmp_path):
    result = _cli(*TRAIN, "--workdir=gs://no-such-bucket-here/run", cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ldm-jax train: error: --workdir=gs://no-such-bucket-here/run is ")
    assert "mesh" not in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
