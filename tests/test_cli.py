"""The command line end to end on the tiny config, and its one-line errors."""

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

TINY = "--config=configs/quickstart.py:tiny"


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.slow
def test_train_sample_evaluate_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "tokenizer.json", "latent_scale.json", "metrics.jsonl"):
        assert (workdir / name).exists(), name
    assert (workdir / "samples" / "diffusion_000004.png").exists()
    assert (workdir / "samples" / "autoencoder_000004.png").exists()
    assert list((workdir / "tensorboard" / "diffusion").iterdir())
    stages = {json.loads(line)["stage"] for line in open(workdir / "metrics.jsonl")}
    assert stages == {"autoencoder", "diffusion"}

    out = tmp_path / "grid.png"
    result = run_cli(
        "sample",
        f"--workdir={workdir}",
        "--prompt=a red circle",
        "--num_per_prompt=3",
        "--sampler=ddim",
        "--steps=3",
        "--guidance=2",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 34, 2 + 3 * 34, 3)  # 3 images of 32x32 with 2-pixel gaps

    result = run_cli(
        "evaluate",
        f"--workdir={workdir}",
        "--num_per_prompt=1",
        "--steps=2",
        f"--out={tmp_path / 'eval'}",
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["num_samples"] == 18
    assert 0.0 <= results["colour_accuracy"] <= 1.0
    assert "colour_accuracy/red" in results and "shape_accuracy/circle" in results

    # Re-running a finished run trains nothing more and succeeds.
    result = run_cli("train", TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr


def test_unknown_config_key_is_one_line(tmp_path):
    result = run_cli("train", TINY, f"--workdir={tmp_path}", "--config.train.stepz=3", timeout=120)
    _assert_one_line_error(result, "stepz")


def test_batch_not_divisible_by_mesh_is_one_line(tmp_path):
    result = run_cli(
        "train",
        TINY,
        f"--workdir={tmp_path}",
        "--config.diffusion.train.batch_size=15",
        timeout=120,
    )
    _assert_one_line_error(result, "config.diffusion.train.batch_size=15 is not divisible")


def test_image_size_not_divisible_by_autoencoder_factor_is_one_line(tmp_path):
    result = run_cli(
        "train", TINY, f"--workdir={tmp_path}", "--config.data.image_size=33", timeout=120
    )
    _assert_one_line_error(result, "not divisible by the autoencoder factor")


def test_missing_dataset_path_is_one_line(tmp_path):
    result = run_cli(
        "train",
        TINY,
        f"--workdir={tmp_path}",
        "--config.data.source=image_folder",
        f"--config.data.path={tmp_path / 'nowhere'}",
        timeout=120,
    )
    _assert_one_line_error(result, "--config.data.path")


def test_stage_two_without_stage_one_is_one_line(tmp_path):
    result = run_cli(
        "train", TINY, f"--workdir={tmp_path}", "--config.stage=diffusion", timeout=300
    )
    _assert_one_line_error(result, "needs a trained autoencoder", "--config.autoencoder.workdir")


def test_sample_without_a_trained_workdir_is_one_line(tmp_path):
    result = run_cli("sample", f"--workdir={tmp_path}", "--prompt=a red circle", timeout=120)
    _assert_one_line_error(result, "config.json")


@pytest.mark.parametrize(
    "command, reads, not_read",
    [
        ("sample", ["--num_per_prompt", "--guidance", "--mode", "--config.KEY"], "--topology"),
        ("evaluate", ["--sweep", "--num_images", "--num_per_prompt"], "--init_image"),
        ("compile", ["--topology", "--per_chip_batch"], "--prompt"),
        ("export", ["--to", "--raw", "--config.KEY"], "--steps"),
    ],
)
def test_command_help_lists_the_flags_it_reads_with_defaults(command, reads, not_read):
    result = run_cli(command, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: ldm-jax {command} ")
    for flag in reads:
        assert f"  {flag}" in result.stdout, flag
    assert f"  {not_read}=" not in result.stdout
    if command == "sample":
        assert "--seed=SEED: Random seed for sampling. (default: '0')" in result.stdout
        assert "the config's sample.guidance_scale" in result.stdout


def test_a_flag_of_another_command_is_one_line_naming_both(tmp_path):
    result = run_cli("sample", f"--workdir={tmp_path}", "--topology=v5e:2x2", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ldm-jax sample: error: --topology is not a flag of `ldm-jax sample`; see "
        "`ldm-jax sample --help`"
    ]


def test_launch_target_help_is_the_launchers_help():
    result = run_cli("launch", "local", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--num_processes" in result.stdout and "--devices_per_process" in result.stdout
