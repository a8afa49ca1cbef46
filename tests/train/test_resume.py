"""A run stopped and resumed is bitwise the run that never stopped, batches included."""

import json

import jax
import numpy as np
import pytest
from conftest import StopAtCall

from ldm_jax.pipeline.load import load_generator
from ldm_jax.train.run import train


def _losses(workdir, stage):
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["stage"] == stage}


def _sampling_params(workdir):
    generator = load_generator(str(workdir))
    return jax.tree.map(np.asarray, generator.params)


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    config = tiny_config
    config.train.log_every = 1
    config.train.checkpoint_every = 100  # only the stop and the end write checkpoints
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(config, str(straight))

    # Stop in the middle of stage 1, then in the middle of stage 2, then finish.
    assert config.autoencoder.train.steps == config.diffusion.train.steps == 4
    assert not train(config, str(resumed), should_stop=StopAtCall(2))  # after AE step 2
    assert not train(config, str(resumed), should_stop=StopAtCall(4))  # after DM step 2
    assert train(config, str(resumed))

    params_a, params_b = _sampling_params(straight), _sampling_params(resumed)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    # Same batches after each restart: the per-step losses agree exactly.
    assert _losses(straight, "autoencoder") == _losses(resumed, "autoencoder")
    assert _losses(straight, "diffusion") == _losses(resumed, "diffusion")
    assert len(_losses(straight, "diffusion")) == 4
