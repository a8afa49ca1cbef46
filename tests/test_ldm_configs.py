"""The CompVis latent diffusion configs: their architectures, and their tiny variants end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, run_cli
from PIL import Image

from ldm_jax import config as config_lib
from ldm_jax.pipeline import builders


def _full_size(name, tmp_path):
    config = load_config(name)
    config.data.path = str(tmp_path)  # an image folder; validation checks that it exists
    config_lib.validate(config, num_devices=8)
    return config


def _parameter_count(config) -> int:
    unet = builders.build_unet(config)
    latents = jnp.zeros((1, *config_lib.latent_shape(config)))
    labels = None if unet.num_classes is None else jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(unet.init, jax.random.key(0), latents, jnp.zeros((1,)), None, labels)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_cin256_is_the_class_conditional_imagenet_ldm(tmp_path):
    config = _full_size("ldm_cin256", tmp_path)
    assert config.autoencoder.kind == "vq" and config.autoencoder.model.num_embeddings == 16384
    assert config_lib.latent_shape(config) == (32, 32, 4)
    unet = builders.build_unet(config)
    assert unet.num_classes == 1000 and unet.class_conditioning == "context"
    assert unet.context_dim == 512 and unet.attention_type == "transformer"
    assert unet.num_attention_heads == (8, 16, 32)  # 32-channel heads
    # The LDM paper's "400M": the U-Net plus the 1001 x 512 class embedding.
    assert _parameter_count(config) == 395_496_708


def test_celebahq256_is_the_unconditional_ldm_4_with_plain_attention(tmp_path):
    config = _full_size("ldm_celebahq256", tmp_path)
    assert config.autoencoder.kind == "vq" and config.autoencoder.model.num_embeddings == 8192
    assert config_lib.latent_shape(config) == (64, 64, 3)
    unet = builders.build_unet(config)
    assert unet.context_dim is None and unet.num_classes is None
    assert unet.attention_type == "plain"
    assert unet.attention_levels == (False, True, True, True)
    assert _parameter_count(config) == 274_056_163  # the LDM paper's 274M


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("diffusion.unet.attention_type", "linear", "attention_type='linear' is not allowed"),
        ("diffusion.unet.class_context_dim", -1, "class_context_dim=-1 must be >= 0"),
        ("diffusion.conditioning", "text", "attention_type='plain' has no cross-attention"),
    ],
)
def test_bad_attention_and_class_keys_are_named(key, value, message):
    config = load_config("ldm_celebahq256", "tiny")
    section, _, leaf = key.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=8)


SHORT_RUN = (
    "--config.autoencoder.train.steps=3",
    "--config.autoencoder.train.batch_size=8",
    "--config.autoencoder.latent_scale_batches=1",
    "--config.diffusion.train.steps=3",
    "--config.diffusion.train.batch_size=8",
    "--config.data.num_train_examples=64",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=3",
    "--config.sample.num_per_prompt=2",
    "--config.sample.num_steps=2",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, condition",
    [("ldm_cin256", ("--label=3", "--label=17")), ("ldm_celebahq256", ())],
    ids=["class_as_context", "unconditional_plain_attention"],
)
def test_tiny_variant_trains_both_stages_and_samples(tmp_path, name, condition):
    workdir = tmp_path / "run"
    result = run_cli(
        "train", f"--config=configs/{name}.py:tiny", f"--workdir={workdir}", *SHORT_RUN
    )
    assert result.returncode == 0, result.stderr
    stages = [json.loads(line)["stage"] for line in open(workdir / "metrics.jsonl")]
    assert stages.count("autoencoder") == 3 and stages.count("diffusion") == 3
    assert "perplexity" in json.loads(open(workdir / "metrics.jsonl").readline())

    out = tmp_path / "grid.png"
    args = (
        "sample",
        f"--workdir={workdir}",
        *condition,
        "--num_per_prompt=2",
        "--steps=2",
        f"--out={out}",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out))
    images = max(1, len(condition)) * 2
    assert grid.shape[0] * grid.shape[1] >= images * 32 * 32 and grid.std() > 0

    if condition:  # a label the model does not know is one clear line
        result = run_cli(
            "sample", f"--workdir={workdir}", "--label=18", "--num_per_prompt=1", "--steps=1"
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "outside [0, 18)" in result.stderr
