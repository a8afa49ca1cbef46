"""The forward process and the training objective: q_sample, targets, inversions, weighting.

With a = sqrt(ᾱ_t) and σ = sqrt(1 − ᾱ_t), z_t = a·z_0 + σ·ε. A model predicts one of
ε ("epsilon"), v = a·ε − σ·z_0 ("v", Salimans & Ho 2022) or z_0 ("x0"); any one of them
together with z_t determines the other two.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import NoiseSchedule, validate_choice


def _per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] shaped to broadcast over the trailing dims of an ``ndim``-rank batch."""
    gathered = values[t]
    return gathered.reshape(gathered.shape + (1,) * (ndim - gathered.ndim))


def _scales(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) at ``t``, broadcastable against an ``ndim``-rank batch."""
    return (
        _per_example(schedule.sqrt_alphas_cumprod, t, ndim),
        _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, ndim),
    )


def _from_epsilon(eps, x_t, signal, noise):
    return (x_t - noise * eps) / signal, eps


def _from_v(v, x_t, signal, noise):
    # Since signal² + noise² = 1, rotating (z_t, v) back gives (z_0, ε).
    return signal * x_t - noise * v, noise * x_t + signal * v


def _from_x0(x0, x_t, signal, noise):
    return x0, (x_t - signal * x0) / noise


_TO_X0_AND_EPS: dict[str, Callable] = {
    "epsilon": _from_epsilon,
    "v": _from_v,
    "x0": _from_x0,
}
_TARGETS: dict[str, Callable] = {
    "epsilon": lambda x0, eps, signal, noise: eps,
    "v": lambda x0, eps, signal, noise: signal * eps - noise * x0,
    "x0": lambda x0, eps, signal, noise: x0,
}
# Min-SNR-γ (Hang et al. 2023): weight the ε-equivalent loss by min(SNR, γ); an ε-loss equals
# the x0-loss times SNR and a v-loss equals it times (SNR + 1), hence the divisions.
_MIN_SNR_WEIGHTS: dict[str, Callable] = {
    "epsilon": lambda clipped, ratio: clipped / ratio,
    "v": lambda clipped, ratio: clipped / (ratio + 1.0),
    "x0": lambda clipped, ratio: clipped,
}
PREDICTION_TYPES = tuple(_TARGETS)


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples z_t ~ q(z_t | z_0) = sqrt(ᾱ_t)·z_0 + sqrt(1 − ᾱ_t)·noise.

    Args:
        schedule: The noise schedule.
        x0: Clean data, shape (B, ...).
        t: Integer timesteps, shape (B,).
        noise: Standard normal noise, the shape of ``x0``.

    Returns:
        The noised batch z_t, the shape of ``x0``.
    """
    signal, noise_scale = _scales(schedule, t, x0.ndim)
    return signal * x0 + noise_scale * noise


def training_target(
    schedule: NoiseSchedule, prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """The regression target of a model with the given parameterisation.

    Args:
        schedule: The noise schedule.
        prediction_type: One of ``PREDICTION_TYPES``.
        x0: Clean data, shape (B, ...).
        noise: The noise that made z_t from ``x0``.
        t: Integer timesteps, shape (B,).

    Returns:
        ε, v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·z_0, or z_0; the shape of ``x0``.
    """
    validate_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return _TARGETS[prediction_type](x0, noise, *_scales(schedule, t, x0.ndim))


def predict_x0_and_eps(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output into the predicted clean data and noise.

    Args:
        schedule: The noise schedule.
        prediction_type: One of ``PREDICTION_TYPES``: what ``model_output`` is.
        model_output: The model's prediction, the shape of ``x_t``.
        x_t: The noised input, shape (B, ...).
        t: Integer timesteps, shape (B,).

    Returns:
        (ẑ_0, ε̂), each the shape of ``x_t``, consistent with ``x_t``.
    """
    validate_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return _TO_X0_AND_EPS[prediction_type](model_output, x_t, *_scales(schedule, t, x_t.ndim))


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at timesteps ``t``, shape of ``t``."""
    alpha_bar = schedule.alphas_cumprod[t]
    return alpha_bar / (1.0 - alpha_bar)


def loss_weight(
    schedule: NoiseSchedule, t: jax.Array, prediction_type: str, min_snr_gamma: float | None
) -> jax.Array:
    """Per-example loss weights: min-SNR-γ weighting, or ones when ``min_snr_gamma`` is None.

    Args:
        schedule: The noise schedule.
        t: Integer timesteps, shape (B,).
        prediction_type: One of ``PREDICTION_TYPES``.
        min_snr_gamma: γ > 0 (Hang et al. use 5), or None for an unweighted loss.

    Returns:
        float32 weights, shape (B,): min(SNR, γ)/SNR for "epsilon", min(SNR, γ)/(SNR + 1)
        for "v", min(SNR, γ) for "x0".
    """
    validate_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if min_snr_gamma is None:
        return jnp.ones(jnp.shape(t), jnp.float32)
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None, got {min_snr_gamma}")
    ratio = snr(schedule, t)
    return _MIN_SNR_WEIGHTS[prediction_type](jnp.minimum(ratio, min_snr_gamma), ratio)


def diffusion_loss(
    schedule: NoiseSchedule,
    prediction_type: str,
    model_output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    min_snr_gamma: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Weighted mean squared error between the model output and its target, in float32.

    Args:
        schedule: The noise schedule.
        prediction_type: One of ``PREDICTION_TYPES``.
        model_output: The model's prediction for z_t = q_sample(schedule, x0, t, noise).
        x0: Clean data, shape (B, ...).
        noise: The noise that made z_t.
        t: Integer timesteps, shape (B,).
        min_snr_gamma: See ``loss_weight``.

    Returns:
        (loss, per_example): the batch mean, a float32 scalar, and the weighted mean squared
        error over all non-batch dims of each example, shape (B,).
    """
    target = training_target(schedule, prediction_type, x0, noise, t)
    squared_error = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(squared_error, axis=tuple(range(1, squared_error.ndim)))
    per_example = per_example * loss_weight(schedule, t, prediction_type, min_snr_gamma)
    return jnp.mean(per_example), per_example
