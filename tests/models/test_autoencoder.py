"""The KL and VQ autoencoders, their latents, per-level attention and decoder features."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.autoencoder import (
    AutoencoderKL,
    DeterministicLatent,
    DiagonalGaussian,
    VQAutoencoder,
)
from ldm_jax.models.layers import conv

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")
RNGS = {"params": KEY, "sample": KEY}


def images(batch=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("block_out_channels,factor", [((8, 16), 2), ((8, 16, 16), 4)])
def test_latents_and_reconstruction_shapes(block_out_channels, factor):
    model = AutoencoderKL(
        block_out_channels=block_out_channels, latent_channels=4, norm_num_groups=4
    )
    x = images(size=16)
    (reconstruction, posterior), variables = jax.eval_shape(model.init_with_output, RNGS, x)
    latents = jax.eval_shape(
        lambda variables: model.apply(variables, x, method=model.encode).mode(), variables
    )
    decoded = jax.eval_shape(
        lambda variables: model.apply(variables, jnp.zeros(latents.shape), method=model.decode),
        variables,
    )
    assert model.downsample_factor == factor
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16 // factor, 16 // factor, 4)
    assert latents.shape == posterior.mean.shape
    assert reconstruction.shape == decoded.shape == x.shape


def test_module_tree_mirrors_diffusers():
    model = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    variables = jax.eval_shape(model.init, RNGS, images())
    shapes = {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.shape
        for path, leaf in jax.tree.leaves_with_path(nn.meta.unbox(variables)["params"])
    }
    expected = {
        "encoder/conv_in/kernel": (3, 3, 3, 8),
        "encoder/down_blocks_0/resnets_0/conv1/kernel": (3, 3, 8, 8),
        "encoder/down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 8, 8),
        "encoder/down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 8, 16),
        "encoder/mid_block/resnets_0/norm1/scale": (16,),
        "encoder/mid_block/attentions_0/group_norm/scale": (16,),
        "encoder/mid_block/attentions_0/to_q/bias": (16,),
        "encoder/mid_block/attentions_0/to_out_0/kernel": (16, 16),
        "encoder/mid_block/resnets_1/conv2/kernel": (3, 3, 16, 16),
        "encoder/conv_norm_out/scale": (16,),
        "encoder/conv_out/kernel": (3, 3, 16, 8),
        "quant_conv/kernel": (1, 1, 8, 8),
        "post_quant_conv/kernel": (1, 1, 4, 4),
        "decoder/conv_in/kernel": (3, 3, 4, 16),
        "decoder/mid_block/attentions_0/to_k/kernel": (16, 16),
        "decoder/up_blocks_0/resnets_1/conv1/kernel": (3, 3, 16, 16),
        "decoder/up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 16, 16),
        "decoder/up_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 16, 8),
        "decoder/up_blocks_1/resnets_1/conv2/kernel": (3, 3, 8, 8),
        "decoder/conv_out/kernel": (3, 3, 8, 3),
    }
    assert {name: shapes.get(name) for name in expected} == expected
    assert not any("time_emb_proj" in name for name in shapes)
    assert not any(name.startswith("decoder/up_blocks_1/upsamplers") for name in shapes)
    assert not any(name.startswith("decoder/up_blocks_0/resnets_2") for name in shapes)


def param_shapes(model, x):
    variables = nn.meta.unbox(jax.eval_shape(model.init, RNGS, x))
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf.shape
        for path, leaf in jax.tree.leaves_with_path(variables["params"])
    }


def test_default_tree_has_attention_only_in_the_mid_blocks():
    shapes = param_shapes(AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4), images())
    # The parameter count of diffusers' AutoencoderKL with this configuration.
    assert sum(np.prod(shape) for shape in shapes.values()) == 43711
    assert all("mid_block" in name for name in shapes if "attentions" in name)


def test_attention_levels_add_attention_after_each_resnet_of_those_levels():
    model = AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_levels=(True, False),
    )
    shapes = param_shapes(model, images())
    level_attention = {
        name.removesuffix("/to_q/kernel")
        for name in shapes
        if name.endswith("/to_q/kernel") and "mid_block" not in name
    }
    # Level 0 (8 channels) is the encoder's first and the decoder's last block.
    assert level_attention == {
        "encoder/down_blocks_0/attentions_0",
        "encoder/down_blocks_0/attentions_1",
        "decoder/up_blocks_1/attentions_0",
        "decoder/up_blocks_1/attentions_1",
        "decoder/up_blocks_1/attentions_2",
    }
    assert shapes["encoder/down_blocks_0/attentions_1/to_q/kernel"] == (8, 8)
    assert shapes["decoder/up_blocks_1/attentions_2/group_norm/scale"] == (8,)


def test_attention_levels_of_the_wrong_length_raise_a_clear_error():
    model = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(True,))
    with pytest.raises(ValueError, match="one entry per entry of block_out_channels"):
        jax.eval_shape(model.init, RNGS, images())


def test_mid_block_attention_can_be_left_out():
    model = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, mid_block_attention=False)
    variables = jax.eval_shape(model.init, RNGS, images())
    assert set(variables["params"]["encoder"]["mid_block"]) == {"resnets_0", "resnets_1"}


@pytest.mark.parametrize(
    "x,message",
    [
        (images(size=6), "divisible by the autoencoder's downsample factor 4"),
        (np.zeros((1, 8, 8, 1)), "in_channels=3"),
    ],
)
def test_invalid_images_raise_a_clear_error(x, message):
    model = AutoencoderKL(block_out_channels=(8, 8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, RNGS, x)


def test_standard_normal_posterior_has_zero_kl_and_mode_is_mean():
    shape = (3, 2, 2, 4)
    standard = DiagonalGaussian(mean=jnp.zeros(shape), logvar=jnp.zeros(shape))
    np.testing.assert_allclose(standard.kl(), np.zeros(3), atol=1e-7)
    shifted = DiagonalGaussian(mean=jnp.ones(shape), logvar=jnp.zeros(shape))
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element, summed over the 16 elements of an example.
    np.testing.assert_allclose(shifted.kl(), np.full(3, 8.0), rtol=1e-6)
    np.testing.assert_array_equal(shifted.mode(), shifted.mean)


def test_from_moments_splits_channels_and_clips_log_variance():
    moments = jnp.concatenate([jnp.full((1, 2, 2, 3), 0.5), jnp.full((1, 2, 2, 3), 50.0)], -1)
    posterior = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(posterior.mean, np.full((1, 2, 2, 3), 0.5))
    np.testing.assert_array_equal(posterior.logvar, np.full((1, 2, 2, 3), 20.0))
    np.testing.assert_allclose(posterior.var, np.exp(20.0), rtol=1e-6)


def test_samples_have_the_posterior_mean_and_std():
    mean = jnp.array([-1.0, 0.0, 2.0])[None, None, None, :]
    logvar = jnp.log(jnp.array([0.25, 1.0, 4.0]))[None, None, None, :]
    posterior = DiagonalGaussian(
        mean=jnp.broadcast_to(mean, (20000, 1, 1, 3)),
        logvar=jnp.broadcast_to(logvar, (20000, 1, 1, 3)),
    )
    samples = np.asarray(posterior.sample(jax.random.key(0)))
    np.testing.assert_allclose(samples.mean(axis=(0, 1, 2)), [-1.0, 0.0, 2.0], atol=0.05)
    np.testing.assert_allclose(samples.std(axis=(0, 1, 2)), [0.5, 1.0, 2.0], rtol=0.03)


@pytest.fixture(scope="module")
def tiny_autoencoder():
    model = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4)
    params = nn.meta.unbox(jax.jit(model.init)(RNGS, images()))
    return model, params


def test_reconstruction_through_the_mode_is_jittable_and_differentiable(tiny_autoencoder):
    model, params = tiny_autoencoder
    x = images()

    def loss(params, x):
        latents = model.apply(params, x, method=model.encode).mode()
        return jnp.mean(jnp.abs(model.apply(params, latents, method=model.decode) - x))

    value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
    assert np.isfinite(value)
    for part in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
        part_grads = jax.tree.leaves(grads["params"][part])
        assert all(np.all(np.isfinite(g)) for g in part_grads)
        assert any(np.any(g != 0) for g in part_grads), f"{part} gets no gradient"


def test_forward_samples_the_posterior_with_the_sample_rng(tiny_autoencoder):
    model, params = tiny_autoencoder
    forward = jax.jit(lambda key: model.apply(params, images(), rngs={"sample": key})[0])
    first, again, other = (forward(jax.random.key(seed, impl="rbg")) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first - other)).max() > 1e-4
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda: model.apply(params, images()))


def test_decoder_features_are_the_input_of_conv_out(tiny_autoencoder):
    model, params = tiny_autoencoder
    latents = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 4)), jnp.float32)
    decode = jax.jit(lambda latents: model.apply(params, latents, True, method=model.decode))
    decoded, features = decode(latents)
    assert features.shape == (2, 8, 8, 8)
    assert np.all(np.asarray(features) >= -0.2785)  # silu's minimum: features are activated
    conv_out = {"params": params["params"]["decoder"]["conv_out"]}
    np.testing.assert_allclose(conv(3).apply(conv_out, features), decoded, atol=1e-6)


def test_deterministic_latent_has_no_noise_and_no_kl():
    latent = DeterministicLatent(mean=jnp.arange(24.0).reshape(2, 2, 2, 3))
    np.testing.assert_array_equal(latent.sample(KEY), latent.mean)
    np.testing.assert_array_equal(latent.mode(), latent.mean)
    np.testing.assert_array_equal(latent.std, np.zeros((2, 2, 2, 3)))
    np.testing.assert_array_equal(latent.kl(), np.zeros(2))


@pytest.fixture(scope="module")
def tiny_vq_autoencoder():
    model = VQAutoencoder(
        block_out_channels=(8,), norm_num_groups=4, num_embeddings=16, attention_levels=(True,)
    )
    # Random parameters of the right shapes: compiling the initialisers would cost seconds.
    rng = np.random.default_rng(4)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, RNGS, images()))
    variables = jax.tree.map(
        lambda leaf: rng.normal(scale=0.3, size=leaf.shape).astype(np.float32), shapes
    )
    return model, variables


def test_vq_autoencoder_tree_mirrors_diffusers_vqmodel(tiny_vq_autoencoder):
    model, variables = tiny_vq_autoencoder
    params = variables["params"]
    assert set(params) == {"encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"}
    assert params["quantize"]["embedding"].shape == (16, 4)
    assert params["encoder"]["conv_out"]["kernel"].shape == (3, 3, 8, 4)  # no doubled channels
    assert params["quant_conv"]["kernel"].shape == params["post_quant_conv"]["kernel"].shape
    assert "attentions_0" in params["encoder"]["down_blocks_0"]
    assert "attentions_1" in params["decoder"]["up_blocks_0"]
    assert model.downsample_factor == 1


def test_vq_decode_of_the_encoded_latent_is_the_quantised_reconstruction(tiny_vq_autoencoder):
    model, variables = tiny_vq_autoencoder
    x = images()

    @jax.jit
    def run(x):
        latent = model.apply(variables, x, method=model.encode)
        decoded = model.apply(variables, latent.mean, method=model.decode)
        indices = model.apply(variables, x, method=model.encode_indices)
        reconstruction, quantized, features = model.apply(
            variables, x, train=False, return_features=True
        )
        return latent, decoded, indices, reconstruction, quantized, features

    latent, decoded, indices, reconstruction, quantized, features = run(x)
    assert latent.mean.shape == (2, 8, 8, 4)
    np.testing.assert_array_equal(latent.kl(), np.zeros(2))
    assert reconstruction.shape == decoded.shape == x.shape
    assert features.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(decoded, reconstruction, atol=1e-6)
    assert indices.shape == (2, 8, 8) and indices.dtype == jnp.int32
    np.testing.assert_array_equal(indices, quantized.indices)
    codebook = variables["params"]["quantize"]["embedding"]
    np.testing.assert_allclose(quantized.quantized, codebook[indices], atol=1e-6)
    assert np.isfinite(quantized.loss) and 1.0 <= quantized.perplexity <= 16.0


def test_vq_training_loss_reaches_encoder_codebook_and_decoder(tiny_vq_autoencoder):
    model, variables = tiny_vq_autoencoder
    x = images()

    def loss(params):
        reconstruction, quantized = model.apply({"params": params}, x)
        return jnp.mean(jnp.abs(reconstruction - x)) + quantized.loss

    grads = jax.jit(jax.grad(loss))(variables["params"])
    for part in ("encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"):
        part_grads = jax.tree.leaves(grads[part])
        assert all(np.all(np.isfinite(g)) for g in part_grads)
        assert any(np.any(g != 0) for g in part_grads), f"{part} gets no gradient"
