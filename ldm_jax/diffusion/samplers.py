"""Reverse-process samplers, each one ``jax.lax.scan`` over the sampling timesteps.

All three samplers are members of the DDIM family (Song et al. 2021, eq. 12): from z_t,
predict (ẑ_0, ε̂) and step to the previous visited timestep with

    z_prev = sqrt(ᾱ_prev)·ẑ_0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·noise,

and differ only in the noise scale σ:

- "ldm": σ² = 1 − ᾱ_prev, i.e. z_prev = sqrt(ᾱ_prev)·ẑ_0 + sqrt(1 − ᾱ_prev)·ε' with fresh
  noise ε' (the x0-then-renoise sampler). It forgets z_t beyond ẑ_0, so it under-disperses:
  the spread of p(z_0 | z_t) around ẑ_0 is lost at every step.
- "ddpm": σ² = β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), the posterior variance of
  q(z_prev | z_t, z_0); with this σ the mean term equals the posterior mean of
  q(z_prev | z_t, ẑ_0), so this is ancestral sampling over the (possibly strided) timesteps.
- "ddim": σ = η·sqrt(β̃); η = 0 is deterministic, η = 1 is "ddpm".

The previous timestep of each step is the next one in the visited sequence, and ᾱ_prev = 1
after the last, so every sampler returns ẑ_0 of its last step with no noise added.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.objectives import PREDICTION_TYPES, predict_x0_and_eps
from ldm_jax.diffusion.schedules import NoiseSchedule, sampling_timesteps, validate_choice

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def posterior_variance(alpha_bar_t: jax.Array, alpha_bar_prev: jax.Array) -> jax.Array:
    """β̃, the variance of q(z_prev | z_t, z_0) between two (possibly non-adjacent) timesteps."""
    return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)


_NOISE_STD: dict[str, Callable[[jax.Array, jax.Array, float], jax.Array]] = {
    "ldm": lambda alpha_bar_t, alpha_bar_prev, eta: jnp.sqrt(1.0 - alpha_bar_prev),
    "ddpm": lambda alpha_bar_t, alpha_bar_prev, eta: jnp.sqrt(
        posterior_variance(alpha_bar_t, alpha_bar_prev)
    ),
    "ddim": lambda alpha_bar_t, alpha_bar_prev, eta: (
        eta * jnp.sqrt(posterior_variance(alpha_bar_t, alpha_bar_prev))
    ),
}
SAMPLERS = tuple(_NOISE_STD)


def noise_std(
    sampler: str, alpha_bar_t: jax.Array, alpha_bar_prev: jax.Array, eta: float = 0.0
) -> jax.Array:
    """The noise scale σ a sampler adds when stepping from ᾱ_t to ᾱ_prev.

    Args:
        sampler: One of ``SAMPLERS``.
        alpha_bar_t: ᾱ at the current timestep.
        alpha_bar_prev: ᾱ at the timestep stepped to (1 after the last step).
        eta: DDIM's η; used by "ddim" only.

    Returns:
        σ, broadcast over the shapes of ``alpha_bar_t`` and ``alpha_bar_prev``.
    """
    validate_choice("sampler", sampler, SAMPLERS)
    return _NOISE_STD[sampler](alpha_bar_t, alpha_bar_prev, eta)


def denoising_step(
    x0: jax.Array,
    eps: jax.Array,
    alpha_bar_prev: jax.Array,
    sigma: jax.Array,
    noise: jax.Array,
) -> jax.Array:
    """One reverse step: sqrt(ᾱ_prev)·ẑ_0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·noise.

    Args:
        x0: Predicted clean data ẑ_0.
        eps: Predicted noise ε̂, consistent with ẑ_0 and z_t.
        alpha_bar_prev: ᾱ of the timestep stepped to.
        sigma: Noise scale from ``noise_std``.
        noise: Standard normal noise, the shape of ``x0``.

    Returns:
        z_prev, the shape of ``x0``.
    """
    # σ² = 1 − ᾱ_prev for "ldm": clamp the float rounding that would make the sqrt NaN.
    direction_scale = jnp.sqrt(jnp.maximum(1.0 - alpha_bar_prev - jnp.square(sigma), 0.0))
    return jnp.sqrt(alpha_bar_prev) * x0 + direction_scale * eps + sigma * noise


def sample(
    denoise_fn: DenoiseFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    timestep_spacing: str = "leading",
    clip_x0: float | None = None,
) -> jax.Array:
    """Runs the reverse process from z_T to z_0 as one ``lax.scan``.

    Jittable: bind the static arguments and trace the rest, building ``denoise_fn`` inside
    the jitted function so model parameters are arguments rather than baked-in constants::

        @functools.partial(jax.jit, static_argnames=("num_steps",))
        def generate(params, x_T, key, num_steps):
            denoise_fn = lambda x, t: unet.apply(params, x, t)
            return sample(denoise_fn, schedule, x_T, key, num_steps=num_steps)

    Args:
        denoise_fn: ``denoise_fn(x_t, t) -> model output`` of the shape of ``x_t``, with ``t``
            an int32 array of shape (B,).
        schedule: The noise schedule the model was trained with.
        x_T: Starting noise, shape (B, ...); the output has its shape and dtype.
        key: PRNG key for the noise the stochastic samplers add.
        sampler: One of ``SAMPLERS`` (static).
        num_steps: Number of denoising steps, in [1, T] (static).
        eta: DDIM's η in [0, 1] (static); ignored by "ldm" and "ddpm".
        prediction_type: What ``denoise_fn`` predicts, one of ``PREDICTION_TYPES`` (static).
        timestep_spacing: One of ``TIMESTEP_SPACINGS`` (static), see ``sampling_timesteps``.
        clip_x0: If set, clip ẑ_0 to [−clip_x0, clip_x0] at every step (pixel-space models
            with data in [−1, 1] use 1); ε̂ is re-derived from the clipped ẑ_0.

    Returns:
        The sample ẑ_0, the shape and dtype of ``x_T``.

    Raises:
        ValueError: If a name or number is outside what is allowed.
    """
    validate_choice("sampler", sampler, SAMPLERS)
    validate_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0}")
    timesteps = jnp.asarray(sampling_timesteps(schedule.num_timesteps, num_steps, timestep_spacing))
    alpha_bar = schedule.alphas_cumprod[timesteps]
    alpha_bar_prev = jnp.concatenate([alpha_bar[1:], jnp.ones((1,), alpha_bar.dtype)])
    sigmas = noise_std(sampler, alpha_bar, alpha_bar_prev, eta)
    batch_size = x_T.shape[0]

    def reverse_step(x_t, step):
        t, step_alpha_bar_prev, sigma, step_key = step
        t_batch = jnp.full((batch_size,), t, jnp.int32)
        x0, eps = predict_x0_and_eps(
            schedule, prediction_type, denoise_fn(x_t, t_batch), x_t, t_batch
        )
        if clip_x0 is not None:
            x0, eps = predict_x0_and_eps(
                schedule, "x0", jnp.clip(x0, -clip_x0, clip_x0), x_t, t_batch
            )
        noise = jax.random.normal(step_key, x_t.shape, jnp.float32)
        x_prev = denoising_step(x0, eps, step_alpha_bar_prev, sigma, noise)
        return x_prev.astype(x_t.dtype), None

    steps = (timesteps, alpha_bar_prev, sigmas, jax.random.split(key, num_steps))
    x0, _ = jax.lax.scan(reverse_step, x_T, steps)
    return x0
