"""Classifier-free guidance (Ho & Salimans 2022): extrapolate from the unconditional output."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def classifier_free_guidance(
    cond_output: jax.Array, uncond_output: jax.Array, guidance_scale: float | jax.Array
) -> jax.Array:
    """Returns uncond + s·(cond − uncond): s = 1 gives cond, s = 0 gives uncond."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


def guided_denoise_fn(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array], guidance_scale: float | jax.Array
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps a doubled-batch model into a guided ``denoise_fn(x, t)`` for ``sample``.

    Args:
        model_fn: ``model_fn(x, t)`` on a batch of 2B whose first B rows are evaluated with
            the condition and last B rows with the null condition (the caller binds both).
        guidance_scale: The guidance scale s (a Python float or a traced scalar).

    Returns:
        ``denoise_fn(x, t)`` for a batch of B that evaluates ``model_fn`` once on
        ``[x; x]``, ``[t; t]`` and combines the two halves with ``classifier_free_guidance``.
    """

    def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        outputs = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        cond_output, uncond_output = jnp.split(outputs, 2)
        return classifier_free_guidance(cond_output, uncond_output, guidance_scale)

    return denoise_fn
