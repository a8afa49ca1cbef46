"""The adversarial terms of stage-1 autoencoder training, as taming's LPIPSWithDiscriminator.

The discriminator learns with a hinge or a "vanilla" (non-saturating logistic) loss; the
autoencoder's generator term is `-mean(logits_fake)`, scaled by an adaptive weight that
balances its gradient against the reconstruction loss's gradient at the decoder's last
layer, and switched on only from step `disc_start`.

`conv_kernel_grad` gives that last-layer gradient without a second backward pass through
the decoder: from the gradient of a loss at the decoder output and the features entering
its last conv, the kernel gradient is one vector-Jacobian product of that conv alone.

Losses are computed in float32 whatever the logits' dtype.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _mean32(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32))


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """`0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`."""
    return 0.5 * (_mean32(jax.nn.relu(1.0 - logits_real)) + _mean32(jax.nn.relu(1.0 + logits_fake)))


def vanilla_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """`0.5 * (mean(softplus(-real)) + mean(softplus(fake)))`: logistic loss, real = 1."""
    return 0.5 * (_mean32(jax.nn.softplus(-logits_real)) + _mean32(jax.nn.softplus(logits_fake)))


DISCRIMINATOR_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_discriminator_loss,
    "vanilla": vanilla_discriminator_loss,
}


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """The autoencoder's adversarial term: `-mean(logits_fake)`."""
    return -_mean32(logits_fake)


def adaptive_weight(
    nll_grad: Any, gan_grad: Any, max_weight: float = 1e4, eps: float = 1e-4
) -> jax.Array:
    """`||nll_grad|| / (||gan_grad|| + eps)` clipped to `[0, max_weight]`, no gradient.

    taming's `calculate_adaptive_weight` before its multiplication by the discriminator
    weight: the two gradients are those of the reconstruction loss and of the generator
    loss at the decoder's last layer.

    Args:
      nll_grad: gradient of the reconstruction loss; an array or a pytree of arrays (its
        global norm is used).
      gan_grad: gradient of the generator loss, the same way.
      max_weight: upper clip.
      eps: added to the generator gradient's norm, so a vanishing gradient stays finite.

    Returns:
      A float32 scalar, under `stop_gradient`.
    """
    weight = optax.tree.norm(nll_grad) / (optax.tree.norm(gan_grad) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight).astype(jnp.float32))


def conv_kernel_grad(features: jax.Array, output_grad: jax.Array, kernel: jax.Array) -> jax.Array:
    """Gradient of `sum(output_grad * conv(features, kernel))` with respect to `kernel`.

    The convolution is that of `ldm_jax.models.layers.conv`: stride 1, padded by
    `kernel_size // 2` on each side, NHWC features and an HWIO kernel. Applied to the
    decoder's last conv, with `output_grad` the gradient of a loss at the decoder output,
    it is that loss's gradient at the last conv kernel (the bias does not enter it).

    Args:
      features: `(B, H, W, C_in)` input of the conv.
      output_grad: `(B, H', W', C_out)` gradient at the conv output.
      kernel: `(kh, kw, C_in, C_out)`.

    Returns:
      An array shaped and typed as `kernel`.

    Raises:
      ValueError: the shapes do not belong to one such convolution.
    """
    if kernel.ndim != 4 or features.ndim != 4 or features.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv_kernel_grad needs NHWC features and an HWIO kernel with matching input "
            f"channels; got features {features.shape} and kernel {kernel.shape}."
        )
    padding = ((kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2)

    def convolve(k: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            features,
            k.astype(features.dtype),
            window_strides=(1, 1),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    output, pullback = jax.vjp(convolve, kernel)
    if output_grad.shape != output.shape:
        raise ValueError(
            f"conv_kernel_grad output_grad has shape {output_grad.shape}, but the conv of "
            f"features {features.shape} with kernel {kernel.shape} gives {output.shape}."
        )
    (grad,) = pullback(output_grad.astype(output.dtype))
    return grad
