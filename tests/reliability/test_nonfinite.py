"""Non-finite values: halt naming the step and the last good checkpoint, or skip and count;
a NaN never reaches a checkpoint. A toy linear model goes through the real step loop, the
real jitted step (donation, shardings) and real orbax checkpoints; one test drives the
whole training CLI into divergence."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli
from toy_training import ToyState, batches, logged, saved_params, toy_config, toy_step, train_toy

from ldm_jax.checkpoint import Checkpointer, read_arrays
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.train.loop import NonFiniteLossError, jit_train_step


def test_halt_names_the_first_bad_step_and_the_last_good_checkpoint(tmp_path):
    # Step 6 is bad; the host looks at steps 5..8 together at step 8 and names step 6.
    with pytest.raises(NonFiniteLossError) as error:
        train_toy(tmp_path, toy_config(), bad_steps={6})
    message = str(error.value)
    assert "at step 6;" in message
    assert "last good checkpoint is step 4" in message and str(tmp_path / "ckpt") in message
    assert "config.train.nonfinite=skip" in message and "\n" not in message


def test_halt_saves_no_checkpoint_after_the_bad_step(tmp_path):
    with pytest.raises(NonFiniteLossError):
        train_toy(tmp_path, toy_config(), bad_steps={6})
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    assert checkpointer.all_steps() == [4]
    step, w = saved_params(checkpointer, 4)
    assert step == 4 and np.isfinite(w).all()


def test_halt_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 1; no checkpoint was saved yet"):
        train_toy(tmp_path, toy_config(), bad_steps={1})


def test_skip_drops_the_bad_updates_and_counts_them(tmp_path):
    config = toy_config(policy="skip")
    checkpointer, state = train_toy(tmp_path, config, bad_steps={3, 6, 7})
    assert int(state.step) == 12 and np.isfinite(np.asarray(state.params["w"])).all()
    for step in checkpointer.all_steps():
        assert np.isfinite(saved_params(checkpointer, step)[1]).all()
    records = logged(tmp_path)
    assert [r["nonfinite_skipped"] for r in records] == [1.0, 2.0, 0.0]
    assert all(np.isfinite(r["loss"]) for r in records)  # averaged over the kept steps

    # A skipped step leaves the params exactly where they were: the checkpoint of step 4
    # holds steps 1, 2 and 4 applied (the update of step 3 dropped).
    expected = ToyState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(3)})
    for batch_step in (1, 2, 4):
        expected = toy_step(expected, {"x": clean_batch(batch_step)}, None)[0]
    np.testing.assert_allclose(
        saved_params(checkpointer, 4)[1], np.asarray(expected.params["w"]), rtol=1e-6
    )


def clean_batch(step):
    """The batch ``batches`` yields at ``step`` when no step is bad."""
    generator = batches(set())
    for _ in range(step - 1):
        next(generator)
    return next(generator)["x"]


def test_skip_halts_once_past_the_budget(tmp_path):
    config = toy_config(policy="skip", max_skips=2)
    budget = r"3 steps skipped .*config.train.max_nonfinite_skips=2"
    with pytest.raises(NonFiniteLossError, match=budget):
        train_toy(tmp_path, config, bad_steps={2, 5, 6})
    assert Checkpointer(str(tmp_path / "ckpt")).all_steps() == [4]


def test_unknown_policy_is_refused():
    mesh = mesh_lib.create_mesh(data=-1)
    with pytest.raises(ValueError, match="config.train.nonfinite='ignore'"):
        jit_train_step(toy_step, None, mesh, nonfinite="ignore")


@pytest.mark.slow
def test_a_diverging_training_run_stops_with_one_line(tmp_path):
    """The quickstart with an absurd learning rate: the CLI names the step and checkpoint."""
    result = run_cli(
        "train",
        "--config=configs/quickstart.py:tiny",
        f"--workdir={tmp_path}",
        "--config.stage=autoencoder",
        "--config.autoencoder.train.learning_rate=1e30",
        "--config.autoencoder.train.warmup_steps=0",
        "--config.autoencoder.train.steps=6",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1",
    )
    assert result.returncode != 0, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "at step" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # The checkpoint the message names was completed before the process exited, and what
    # was saved before the divergence is finite.
    checkpoints = tmp_path / "checkpoints" / "autoencoder"
    named = int(last.split("last good checkpoint is step ")[1].split()[0])
    assert f"in {checkpoints}" in last
    saved = sorted(
        (p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    assert int(saved[-1].name) == named
    for step_dir in saved:
        leaves = list(read_arrays(str(step_dir)).values())
        assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
