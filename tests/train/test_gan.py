"""The adversarial loss terms of stage-1 training, on values worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config import schema
from ldm_jax.models.layers import conv
from ldm_jax.train.gan import (
    DISCRIMINATOR_LOSSES,
    adaptive_weight,
    conv_kernel_grad,
    generator_loss,
    hinge_discriminator_loss,
    vanilla_discriminator_loss,
)


def full(value, shape=(2, 3, 3, 1)):
    return jnp.full(shape, value, jnp.float32)


@pytest.mark.parametrize(
    "real,fake,want",
    [
        (2.0, -2.0, 0.0),  # both beyond the margin
        (0.0, 0.0, 1.0),
        (0.5, 0.5, 0.5 * (0.5 + 1.5)),
        (-1.0, 3.0, 0.5 * (2.0 + 4.0)),
    ],
)
def test_hinge_discriminator_loss(real, fake, want):
    got = hinge_discriminator_loss(full(real), full(fake))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize(
    "real,fake,want",
    [
        (0.0, 0.0, np.log(2.0)),
        (1.0, -1.0, np.log1p(np.exp(-1.0))),
        (-2.0, 3.0, 0.5 * (np.log1p(np.exp(2.0)) + np.log1p(np.exp(3.0)))),
    ],
)
def test_vanilla_discriminator_loss(real, fake, want):
    got = vanilla_discriminator_loss(full(real), full(fake))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_losses_average_over_patches_and_are_float32():
    real = jnp.array([[3.0, 0.0]], jnp.bfloat16)
    fake = jnp.array([[-1.0, 1.0]], jnp.bfloat16)
    got = hinge_discriminator_loss(real, fake)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), 0.5 * (0.5 + 1.0))


def test_discriminator_losses_are_named_for_the_config():
    assert DISCRIMINATOR_LOSSES == {
        "hinge": hinge_discriminator_loss,
        "vanilla": vanilla_discriminator_loss,
    }
    # Every value config.autoencoder.loss.disc_loss may take has its loss, and no other.
    assert tuple(DISCRIMINATOR_LOSSES) == schema.DISCRIMINATOR_LOSSES


def test_generator_loss_is_minus_the_mean_logit():
    logits = jnp.array([[1.0, 2.0], [3.0, -2.0]])
    np.testing.assert_allclose(float(generator_loss(logits)), -1.0)


def test_adaptive_weight_is_the_ratio_of_global_norms():
    nll_grad = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}  # global norm 5
    gan_grad = jnp.array([0.0, 2.0])  # norm 2
    np.testing.assert_allclose(float(adaptive_weight(nll_grad, gan_grad)), 5.0 / (2.0 + 1e-4))
    np.testing.assert_allclose(
        float(adaptive_weight(nll_grad, gan_grad, eps=0.5)), 5.0 / 2.5, rtol=1e-6
    )


def test_adaptive_weight_is_clipped():
    big = jnp.array([1e3])
    assert float(adaptive_weight(big, jnp.zeros(3))) == 1e4
    assert float(adaptive_weight(big, jnp.zeros(3), max_weight=10.0)) == 10.0


def test_adaptive_weight_passes_no_gradient():
    gan_grad = jnp.array([1.0, 2.0])
    grad = jax.grad(lambda g: adaptive_weight(3.0 * g, gan_grad) * jnp.sum(g))(jnp.ones(2))
    # Only the plain sum contributes: the weight is a constant (norm ratio 3 * sqrt 2 / sqrt 5).
    weight = float(adaptive_weight(3.0 * jnp.ones(2), gan_grad))
    np.testing.assert_allclose(np.asarray(grad), weight)
    np.testing.assert_array_equal(
        np.asarray(jax.grad(lambda g: adaptive_weight(g, gan_grad))(jnp.ones(2))), 0.0
    )


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_conv_kernel_grad_equals_the_gradient_through_the_conv_layer(kernel_size):
    rng = np.random.default_rng(kernel_size)
    features = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
    output_grad = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    kernel = rng.normal(size=(kernel_size, kernel_size, 4, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    layer = conv(3, kernel_size)

    def loss(k):
        output = layer.apply({"params": {"kernel": k, "bias": bias}}, features)
        return jnp.sum(output_grad * output)

    got = conv_kernel_grad(features, output_grad, kernel)
    assert got.shape == kernel.shape and got.dtype == kernel.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(loss)(kernel)), atol=1e-4)


def test_conv_kernel_grad_names_mismatched_shapes():
    with pytest.raises(ValueError, match="output_grad has shape"):
        conv_kernel_grad(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 5)), jnp.zeros((3, 3, 2, 3)))
    with pytest.raises(ValueError, match="matching input channels"):
        conv_kernel_grad(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 5, 3)))
