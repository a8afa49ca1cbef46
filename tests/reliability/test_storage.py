"""Storage: an unwritable or full workdir is found before training starts; a save that fails
in the background stops the run at the next step, naming the step, instead of a silent gap."""

import collections

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from conftest import run_cli
from toy_training import ToyState, logged, toy_config, train_toy

from ldm_jax import storage
from ldm_jax.checkpoint import Checkpointer, CheckpointSaveError
from ldm_jax.train import run as run_lib

GIB = 1024**3
Usage = collections.namedtuple("Usage", "total used free")


def test_a_workdir_that_cannot_be_created_is_one_line_before_any_compilation(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli(
        "train", "--config=configs/quickstart.py:tiny", f"--workdir={blocker}/run", timeout=300
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"--workdir={blocker}/run is not a writable directory" in last
    assert "Traceback" not in result.stderr
    assert "mesh" not in result.stderr  # stopped before the mesh, the models, the compile


def test_a_full_disk_is_refused_naming_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: Usage(10 * GIB, 0, GIB // 2))
    with pytest.raises(OSError, match=r"has 0\.50 GiB free, less than config\.train\.min_free"):
        run_lib.check_workdir(str(tmp_path / "run"), min_free_gib=1.0)
    run_lib.check_workdir(str(tmp_path / "run"), min_free_gib=0.25)  # enough: no error


def test_checkpoint_space_counts_the_checkpoints_still_to_write(tmp_path, monkeypatch):
    state = ToyState(jnp.zeros((), jnp.int32), {"w": jnp.zeros((1024, 1024), jnp.float32)})
    checkpointer = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    free = {"bytes": int(0.5 * GIB + 2.5 * 4 * 1024**2)}  # room for 2 of 3 checkpoints
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: Usage(10 * GIB, 0, free["bytes"]))
    with pytest.raises(CheckpointSaveError, match=r"3 checkpoint\(s\) .*max_to_keep"):
        checkpointer.check_space(state, min_free_gib=0.5)
    free["bytes"] += 4 * 1024**2
    checkpointer.check_space(state, min_free_gib=0.5)


def test_a_full_disk_stops_training_before_the_first_step(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: Usage(10 * GIB, 0, GIB))
    tiny_config.train.min_free_gib = 0.999  # the workdir check passes; the checkpoints don't
    with pytest.raises(CheckpointSaveError, match="autoencoder"):
        run_lib.train(tiny_config, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn

    async def fail_step_8(self, item, directory):
        if directory.parent.name.split(".")[0] == "8":  # <checkpoints>/8[.tmp...]/<item>
            raise OSError(28, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(handler, "_save_fn", fail_step_8)
    config = toy_config(steps=16, log_every=1, checkpoint_every=4)
    with pytest.raises(CheckpointSaveError) as error:
        train_toy(tmp_path, config, bad_steps=set())
    assert "checkpoint of step 8 was not written" in str(error.value)
    assert "newest checkpoint there is step 4" in str(error.value)
    # It surfaced as soon as the background save ended (a per-step check) and at the
    # latest when the next save (step 12) began: never a silent gap to the end of the run.
    assert max(r["step"] for r in logged(tmp_path)) <= 12
    assert Checkpointer(str(tmp_path / "ckpt")).all_steps() == [4]
