"""Inference sharded like training: a model trained with FSDP is sampled and evaluated with
FSDP (``--config.mesh.fsdp=8``), no device holding more than its share of the params, and
draws the same images as on a replicated mesh."""

import collections

import jax
import numpy as np
import pytest
from conftest import cli_session, load_config
from PIL import Image

from ldm_jax import cli
from ldm_jax.config import ConfigError, load_workdir_config
from ldm_jax.pipeline import generator as generator_lib
from ldm_jax.pipeline.load import load_model
from ldm_jax.train.run import train

FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=8")
REPLICATED = ("--config.mesh.data=8", "--config.mesh.fsdp=1")


@pytest.fixture(scope="module")
def fsdp_workdir(tmp_path_factory):
    """The tiny quickstart trained on a (data=1, fsdp=8) mesh."""
    config = load_config("quickstart", "tiny")
    config.mesh.data, config.mesh.fsdp = 1, 8
    workdir = tmp_path_factory.mktemp("fsdp") / "run"
    assert train(config, str(workdir))
    return workdir


def _largest_device_share(params) -> float:
    """The parameter bytes on the fullest device over the bytes of all the params."""
    on_device, total = collections.Counter(), 0
    for leaf in jax.tree.leaves(params):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            on_device[shard.device] += shard.data.nbytes
    return max(on_device.values()) / total


def _run_cli(*args) -> list:
    """``ldm-jax ARGS`` in this process (8 devices); returns the params of every Generator
    the command made."""
    seen = []
    original = generator_lib.Generator.__init__

    def spy(self, model, params, *rest, **kwargs):
        seen.append(params)
        original(self, model, params, *rest, **kwargs)

    argv = ["ldm-jax", *args]
    with cli_session(argv), pytest.MonkeyPatch.context() as patch:
        patch.setattr(generator_lib.Generator, "__init__", spy)
        cli.main(cli._parse_flags(argv))
    return seen


def test_workdir_was_trained_with_fsdp(fsdp_workdir):
    config = load_workdir_config(str(fsdp_workdir))
    assert (config.mesh.data, config.mesh.fsdp) == (1, 8)


def test_sample_keeps_each_device_share_and_draws_the_replicated_images(fsdp_workdir, tmp_path):
    sample = ("sample", f"--workdir={fsdp_workdir}", "--prompt=a red circle", "--steps=3")
    sharded = _run_cli(*sample, f"--out={tmp_path / 'fsdp.png'}", *FSDP)
    replicated = _run_cli(*sample, f"--out={tmp_path / 'replicated.png'}", *REPLICATED)
    assert len(sharded) == len(replicated) == 1
    assert _largest_device_share(sharded[0]) <= 1 / 6
    assert _largest_device_share(replicated[0]) == 1.0  # every device holds every param
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("fsdp", "replicated"))
    difference = np.abs(ours.astype(int) - theirs)
    # The same images; float sums in another order may round a few pixel values differently.
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_sweep_keeps_each_device_share_and_scores_as_the_replicated_mesh(fsdp_workdir, tmp_path):
    sweep = (
        "evaluate",
        f"--workdir={fsdp_workdir}",
        "--sweep=steps=2,3",
        "--num_per_prompt=1",
    )
    sharded = _run_cli(*sweep, f"--out={tmp_path / 'fsdp'}", *FSDP)
    replicated = _run_cli(*sweep, f"--out={tmp_path / 'replicated'}", *REPLICATED)
    assert sharded and all(_largest_device_share(p) <= 1 / 6 for p in sharded)
    for name in ("steps2.png", "steps3.png"):
        ours, theirs = (
            np.asarray(Image.open(tmp_path / run / "grids" / name)).astype(int)
            for run in ("fsdp", "replicated")
        )
        assert np.abs(ours - theirs).max() <= 2, name
    assert len(replicated) == len(sharded)


def test_params_are_restored_onto_the_mesh_of_the_overridden_config(fsdp_workdir):
    config = load_workdir_config(str(fsdp_workdir))
    loaded = load_model(str(fsdp_workdir), config)
    assert dict(loaded.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    largest = max(jax.tree.leaves(loaded.params["unet"]), key=lambda x: x.size)
    assert largest.sharding.mesh.shape == loaded.mesh.shape
    assert largest.addressable_shards[0].data.size * 8 == largest.size  # split, not gathered
    config.mesh.fsdp = 3  # 3 does not divide the 8 devices
    with pytest.raises(ConfigError, match="mesh"):
        load_model(str(fsdp_workdir), config)


def test_a_mesh_that_does_not_fit_is_one_line_naming_the_flag(fsdp_workdir, capsys):
    argv = ["ldm-jax", "sample", f"--workdir={fsdp_workdir}", "--prompt=a", "--config.mesh.fsdp=3"]
    with cli_session(argv), pytest.raises(SystemExit) as exit_:
        cli.main(cli._parse_flags(argv))
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("ldm-jax sample: error:") and "--config.mesh" in lines[-1]
