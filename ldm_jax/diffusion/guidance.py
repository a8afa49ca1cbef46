"""Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional output.

Optionally rescaled (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", section 3.4): a large guidance scale inflates the guided output's standard
deviation beyond anything the model saw in training, which over-exposes images. Rescaling
gives it the conditional output's standard deviation, mixed back with the plain guided
output by φ so that some of guidance's contrast stays.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def classifier_free_guidance(
    cond_output: jax.Array, uncond_output: jax.Array, guidance_scale: float | jax.Array
) -> jax.Array:
    """Returns uncond + s·(cond − uncond): s = 1 gives cond, s = 0 gives uncond."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


def rescale_guidance(
    guided_output: jax.Array, cond_output: jax.Array, guidance_rescale: float | jax.Array
) -> jax.Array:
    """Rescales a guided output's per-example std to the conditional one's, mixed by φ.

    Returns φ·guided·std(cond)/std(guided) + (1 − φ)·guided, the standard deviations taken
    over every axis but the first (diffusers' ``rescale_noise_cfg``).

    Args:
        guided_output: The output of ``classifier_free_guidance``, shape (B, ...).
        cond_output: The conditional output, the shape of ``guided_output``.
        guidance_rescale: φ in [0, 1]; 0 returns ``guided_output`` unchanged.
    """
    axes = tuple(range(1, guided_output.ndim))
    # Both stds with one normalisation: only their ratio matters.
    ratio = jnp.std(cond_output, axis=axes, keepdims=True) / jnp.std(
        guided_output, axis=axes, keepdims=True
    )
    return guidance_rescale * guided_output * ratio + (1.0 - guidance_rescale) * guided_output


def guided_denoise_fn(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    guidance_scale: float | jax.Array,
    guidance_rescale: float = 0.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps a doubled-batch model into a guided ``denoise_fn(x, t)`` for ``sample``.

    Args:
        model_fn: ``model_fn(x, t)`` on a batch of 2B whose first B rows are evaluated with
            the condition and last B rows with the null condition (the caller binds both).
        guidance_scale: The guidance scale s (a Python float or a traced scalar).
        guidance_rescale: φ of ``rescale_guidance`` (static); 0 leaves guidance as it is.

    Returns:
        ``denoise_fn(x, t)`` for a batch of B that evaluates ``model_fn`` once on
        ``[x; x]``, ``[t; t]`` and combines the two halves with ``classifier_free_guidance``
        (and ``rescale_guidance`` when φ > 0).

    Raises:
        ValueError: If ``guidance_rescale`` is outside [0, 1].
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")

    def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        outputs = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        cond_output, uncond_output = jnp.split(outputs, 2)
        guided = classifier_free_guidance(cond_output, uncond_output, guidance_scale)
        if guidance_rescale > 0.0:
            guided = rescale_guidance(guided, cond_output, guidance_rescale)
        return guided

    return denoise_fn
