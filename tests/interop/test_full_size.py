"""The full-size Stable Diffusion 1.5 U-Net: the real shapes, created sharded on 8 devices."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.interop import diffusers as diffusers_interop
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import builders
from tests.conftest import load_config

SD15_UNET_PARAMETERS = 859_520_964


def _sd15_init(unet):
    def init(key):
        latents = jnp.zeros((1, 64, 64, 4), jnp.float32)
        context = jnp.zeros((1, 77, 768), jnp.float32)
        return unet.init(key, latents, jnp.zeros((1,), jnp.int32), context)["params"]

    return init


def test_sd15_unet_has_diffusers_parameter_count_and_is_created_sharded():
    config = load_config("sd15")
    unet = builders.build_unet(config)
    init = _sd15_init(unet)
    # threefry, as training uses on a mesh: its draws are partitioned over the devices.
    key = jax.random.key(0)
    ours = _count(init, key)
    theirs = _diffusers_count(
        diffusers.UNet2DConditionModel, diffusers_interop.unet_to_diffusers_config(unet)
    )
    assert ours == theirs == SD15_UNET_PARAMETERS

    mesh = mesh_lib.create_mesh(data=1, fsdp=8, tensor=1)
    rules = mesh_lib.axis_rules_from_config(config.mesh.axis_rules)
    params, shardings = sharding.create_sharded(init, mesh, rules, key)
    leaves = jax.tree.leaves(params)
    assert sum(leaf.size for leaf in leaves) == SD15_UNET_PARAMETERS
    # No device holds the whole model: the big kernels are split 8 ways over fsdp.
    on_first_device = sum(
        shard.data.size
        for leaf in leaves
        for shard in leaf.addressable_shards
        if shard.device == jax.devices()[0]
    )
    assert on_first_device < SD15_UNET_PARAMETERS / 6
    kernel = params["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["ff"]["net_2"][
        "kernel"
    ]
    assert kernel.shape == (2560, 640)  # ("mlp", "embed"): embed goes over fsdp
    assert kernel.addressable_shards[0].data.shape == (2560, 640 // 8)


def _diffusers_count(model_class, config: dict) -> int:
    with torch.device("meta"):
        model = model_class(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


def _count(init, key) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(jax.eval_shape(init, key)))


def test_sd2_unet_config_is_diffusers_sd2_architecture():
    config = load_config("sd15", "v2")
    unet = builders.build_unet(config)
    assert unet.heads_per_level == (5, 10, 20, 20)  # 64-wide heads

    def init(key):
        latents = jnp.zeros((1, 96, 96, 4), jnp.float32)
        context = jnp.zeros((1, 77, 1024), jnp.float32)
        return unet.init(key, latents, jnp.zeros((1,), jnp.int32), context)["params"]

    ours = _count(init, jax.random.key(0, impl="rbg"))
    theirs = _diffusers_count(
        diffusers.UNet2DConditionModel, diffusers_interop.unet_to_diffusers_config(unet)
    )
    assert ours == theirs == 865_910_724


@pytest.mark.parametrize("variant", ["f4", "f8"])
def test_compvis_autoencoder_configs_match_diffusers_counts(variant):
    config = load_config(f"autoencoder_kl_{variant}")
    vae = builders.build_autoencoder(config)
    assert vae.downsample_factor == int(variant[1])

    def init(key):
        images = jnp.zeros((1, 64, 64, 3), jnp.float32)
        return vae.init(key, images, False)["params"]

    ours = _count(init, jax.random.key(0, impl="rbg"))
    theirs = _diffusers_count(
        diffusers.AutoencoderKL, diffusers_interop.vae_to_diffusers_config(vae, 0.18215)
    )
    assert ours == theirs
    if variant == "f8":
        assert ours == 83_653_863  # Stable Diffusion's autoencoder


CELEBAHQ_UNET_PARAMETERS = 274_056_163


def test_celebahq_ldm_unet_is_diffusers_unet2d_of_the_same_parameter_count():
    """The CompVis CelebA-HQ LDM-4 U-Net (plain attention, 32-wide heads) is a UNet2DModel."""
    unet = builders.build_unet(load_config("ldm_celebahq256"))
    assert unet.attention_type == "plain" and unet.heads_per_level == (7, 14, 21, 28)

    def init(key):
        latents = jnp.zeros((1, 64, 64, 3), jnp.float32)
        return unet.init(key, latents, jnp.zeros((1,), jnp.int32))["params"]

    config = diffusers_interop.unet_to_diffusers_config(unet)
    assert config["_class_name"] == "UNet2DModel" and config["attention_head_dim"] == 32
    ours = _count(init, jax.random.key(0, impl="rbg"))
    assert ours == _diffusers_count(diffusers.UNet2DModel, config) == CELEBAHQ_UNET_PARAMETERS


@pytest.mark.parametrize(
    "name,parameters", [("ldm_celebahq256", 55_322_782), ("autoencoder_vq_f8", 67_717_295)]
)
def test_compvis_vq_first_stages_match_diffusers_vq_model_counts(name, parameters):
    """vq-f4 (the CelebA-HQ LDM's) and vq-f8 (attention at its last level)."""
    vq = builders.build_autoencoder(load_config(name))

    def init(key):
        images = jnp.zeros((1, 64, 64, 3), jnp.float32)
        return vq.init(key, images, False)["params"]

    config = diffusers_interop.vae_to_diffusers_config(vq, 1.0)
    assert config["_class_name"] == "VQModel"
    ours = _count(init, jax.random.key(0, impl="rbg"))
    assert ours == _diffusers_count(diffusers.VQModel, config) == parameters
