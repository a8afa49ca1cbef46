"""The patch-GAN discriminator: shapes, taming's parameters and numbers, global batch norm."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from ldm_jax.interop.convert import torch_to_flax
from ldm_jax.models.discriminator import NLayerDiscriminator

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")
BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def taming_discriminator(input_nc=3, ndf=64, n_layers=3):
    """taming's NLayerDiscriminator (BatchNorm, weights_init), written out in torch.nn."""
    sequence = [torch.nn.Conv2d(input_nc, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2, True)]
    multiplier = 1
    for n in range(1, n_layers + 1):
        previous, multiplier = multiplier, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        sequence += [
            torch.nn.Conv2d(ndf * previous, ndf * multiplier, 4, stride, 1, bias=False),
            torch.nn.BatchNorm2d(ndf * multiplier),
            torch.nn.LeakyReLU(0.2, True),
        ]
    sequence += [torch.nn.Conv2d(ndf * multiplier, 1, 4, 1, 1)]
    main = torch.nn.Sequential(*sequence)
    for module in main.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(module.weight, 1.0, 0.02)
            torch.nn.init.constant_(module.bias, 0.0)
    model = torch.nn.Module()
    model.main = main  # so state-dict names are `main.{i}.*`, as in taming
    return model


def patch_grid_size(image_size, num_layers):
    """Output side length: stride-2 4x4 convs pad 1 halve it, stride-1 ones take one off."""
    size = image_size
    for _ in range(num_layers):
        size = (size + 2 - 4) // 2 + 1
    for _ in range(2):
        size = size + 2 - 4 + 1
    return size


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("image_size,num_layers", [(32, 3), (64, 3), (32, 2), (64, 2)])
def test_output_is_a_grid_of_patch_logits(image_size, num_layers):
    images = jnp.zeros((2, image_size, image_size, 3))
    model = NLayerDiscriminator(base_channels=8, num_layers=num_layers)
    logits, _ = jax.eval_shape(model.init_with_output, KEY, images)
    side = patch_grid_size(image_size, num_layers)
    assert logits.shape == (2, side, side, 1)
    if (image_size, num_layers) == (32, 3):
        assert side == 2


def test_parameters_are_tamings_and_there_is_no_batch_stats_collection():
    reference = taming_discriminator()
    torch_count = sum(p.numel() for p in reference.parameters())
    variables = jax.eval_shape(NLayerDiscriminator().init, KEY, jnp.zeros((1, 32, 32, 3)))
    assert set(variables) == {"params"}
    # Convs followed by BatchNorm have no bias in taming: 2,765,633, not the 2,766,529 of
    # the same network with those biases.
    assert count(variables["params"]) == torch_count == 2_765_633
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {f"main_{i}" for i in (0, 2, 3, 5, 6, 8, 9, 11)}
    assert set(params["main_2"]) == {"kernel"} and set(params["main_11"]) == {"kernel", "bias"}
    specs = nn.get_partition_spec(variables["params"])
    assert specs["main_2"]["kernel"] == PartitionSpec(None, None, "conv_in", "conv_out")
    assert specs["main_3"]["scale"] == PartitionSpec("norm")


def test_without_norm_every_conv_has_a_bias():
    variables = jax.eval_shape(
        NLayerDiscriminator(base_channels=8, norm="none").init, KEY, jnp.zeros((1, 32, 32, 3))
    )
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {f"main_{i}" for i in (0, 2, 4, 6, 8)}
    assert all(set(layer) == {"kernel", "bias"} for layer in params.values())


def test_an_unknown_norm_is_named():
    with pytest.raises(ValueError, match="norm must be one of"):
        NLayerDiscriminator(norm="group").init(KEY, jnp.zeros((1, 32, 32, 3)))


def test_init_follows_tamings_weights_init():
    params = nn.meta.unbox(
        jax.jit(NLayerDiscriminator().init)(KEY, jnp.zeros((1, 32, 32, 3)))["params"]
    )
    kernel = np.asarray(params["main_8"]["kernel"])
    assert abs(kernel.mean()) < 1e-3 and abs(kernel.std() - 0.02) < 1e-3
    scale = np.asarray(params["main_9"]["scale"])
    assert abs(scale.mean() - 1.0) < 5e-3 and abs(scale.std() - 0.02) < 5e-3
    np.testing.assert_array_equal(np.asarray(params["main_9"]["bias"]), 0.0)


def test_matches_taming_in_training_mode():
    torch.manual_seed(0)
    reference = taming_discriminator().train()
    model = NLayerDiscriminator()
    abstract = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))["params"]
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = torch_to_flax(state_dict, abstract, ignore=BATCH_NORM_BUFFERS, what="discriminator")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference.main(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = jax.jit(model.apply)({"params": params}, images)
    assert got.shape == (2, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)


def test_batch_statistics_are_global_over_a_sharded_batch():
    model = NLayerDiscriminator(base_channels=8)
    images = np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    params = flax.core.unfreeze(nn.meta.unbox(jax.jit(model.init)(KEY, images[:1])["params"]))
    apply = jax.jit(model.apply)
    single_device = np.asarray(apply({"params": params}, images))

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_images = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        sharded = apply({"params": replicated}, sharded_images)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), single_device, atol=1e-5)

    # Normalising each device's image by its own statistics would give other logits.
    per_image = np.concatenate(
        [np.asarray(apply({"params": params}, images[i : i + 1])) for i in range(2)]
    )
    assert not np.allclose(per_image, single_device[:2], atol=1e-3)
