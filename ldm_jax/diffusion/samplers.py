"""Reverse-process samplers, each one ``jax.lax.scan`` over the sampling timesteps.

Three samplers are members of the DDIM family (Song et al. 2021, eq. 12): from z_t, predict
(ẑ_0, ε̂) and step to the previous visited timestep with

    z_prev = sqrt(ᾱ_prev)·ẑ_0 + sqrt(1 − ᾱ_prev − σ²)·ε̂ + σ·noise,

and differ only in the noise scale σ:

- "ldm": σ² = 1 − ᾱ_prev, i.e. z_prev = sqrt(ᾱ_prev)·ẑ_0 + sqrt(1 − ᾱ_prev)·ε' with fresh
  noise ε' (the x0-then-renoise sampler). It forgets z_t beyond ẑ_0, so it under-disperses:
  the spread of p(z_0 | z_t) around ẑ_0 is lost at every step.
- "ddpm": σ² = β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev), the posterior variance of
  q(z_prev | z_t, z_0); with this σ the mean term equals the posterior mean of
  q(z_prev | z_t, ẑ_0), so this is ancestral sampling over the (possibly strided) timesteps
  (diffusers' DDPMScheduler with variance_type "fixed_small").
- "ddim": σ = η·sqrt(β̃); η = 0 is deterministic, η = 1 is "ddpm".

The fourth, "dpmpp_2m", is DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", algorithm 2): a deterministic multistep
solver of the probability-flow ODE in the half log-SNR λ = log(sqrt(ᾱ)/sqrt(1 − ᾱ)) that
extrapolates the data prediction ẑ_0 linearly from the previous step's, see
``dpm_solver_step``.

After the last step ᾱ is 1 (``set_alpha_to_one``), so a sampler returns ẑ_0 of its last
step with no noise added, or ᾱ_0 of the first training timestep, as Stable Diffusion's DDIM
configuration and the original LDM sampler do.

Editing applications reuse the same loop: image-to-image starts part-way down the timesteps
(``start_step``), and inpainting rewrites every step's output (``step_hook``).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.objectives import PREDICTION_TYPES, predict_x0_and_eps
from ldm_jax.diffusion.schedules import NoiseSchedule, sampling_timesteps, validate_choice

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# step_hook(z_next, alpha_bar_next, key) -> z_next: rewrites each step's output, e.g. to put
# back what is known of the sample at that noise level (inpainting).
StepHook = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_DPM_SOLVER = "dpmpp_2m"
# diffusers' DPM-Solver schedulers, run with lower_order_final, end on a first-order step when
# they take fewer steps than this, or always when that step goes to noise level zero.
_DPM_SOLVER_SECOND_ORDER_FINAL_MIN_STEPS = 15


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
SAMPLERS = (*_NOISE_STD, _DPM_SOLVER)


def noise_std(
    sampler: str, alpha_bar_t: jax.Array, alpha_bar_prev: jax.Array, eta: float = 0.0
) -> jax.Array:
    """The noise scale σ a DDIM-family sampler adds when stepping from ᾱ_t to ᾱ_prev.

    Args:
        sampler: One of "ldm", "ddpm", "ddim".
        alpha_bar_t: ᾱ at the current timestep.
        alpha_bar_prev: ᾱ at the timestep stepped to.
        eta: DDIM's η; used by "ddim" only.

    Returns:
        σ, broadcast over the shapes of ``alpha_bar_t`` and ``alpha_bar_prev``.
    """
    validate_choice("sampler", sampler, tuple(_NOISE_STD))
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


def _log_snr_increment(alpha_bar_from: jax.Array, alpha_bar_to: jax.Array) -> jax.Array:
    """λ_to − λ_from with λ = ½·log(ᾱ/(1 − ᾱ)); infinite when ᾱ_to = 1.

    Written as ½·log1p(...) of a difference of ᾱ rather than a difference of logs, so short
    steps keep their relative precision in float32.
    """
    return 0.5 * jnp.log1p(
        (alpha_bar_to - alpha_bar_from) / (alpha_bar_from * (1.0 - alpha_bar_to))
    )


def dpm_solver_step(
    x_t: jax.Array,
    x0: jax.Array,
    previous_x0: jax.Array,
    alpha_bar_t: jax.Array,
    alpha_bar_next: jax.Array,
    alpha_bar_previous: jax.Array,
    second_order: bool | jax.Array,
) -> jax.Array:
    """One DPM-Solver++(2M) step from ᾱ_t to ᾱ_next (Lu et al. 2022, algorithm 2).

    With α = sqrt(ᾱ), σ = sqrt(1 − ᾱ) and the step h = λ_next − λ_t in the half log-SNR,

        z_next = (σ_next/σ_t)·z_t + α_next·(1 − e^{−h})·D,
        D = ẑ_0 + h/(2·h_previous)·(ẑ_0 − ẑ_0,previous)  (second order; D = ẑ_0 at first order),

    where h_previous = λ_t − λ_previous is the step that ended at t. The first-order step is
    DDIM with η = 0; a step to ᾱ_next = 1 returns D. This is diffusers'
    DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" and solver_type "midpoint".

    Args:
        x_t: The current sample z_t.
        x0: ẑ_0 predicted at t.
        previous_x0: ẑ_0 predicted at the previous step; ignored at first order.
        alpha_bar_t: ᾱ at t.
        alpha_bar_next: ᾱ stepped to; 1 means noise level zero.
        alpha_bar_previous: ᾱ at the previous step's timestep; ignored at first order.
        second_order: Whether to extrapolate ẑ_0 from ``previous_x0`` (a bool or bool array).

    Returns:
        z_next, the shape of ``x_t``, in the dtype the arguments promote to.
    """
    h = _log_snr_increment(alpha_bar_t, alpha_bar_next)
    h_previous = _log_snr_increment(alpha_bar_previous, alpha_bar_t)
    # The unused branch may divide by zero (first step) or hold h = ∞ (a step to ᾱ = 1): the
    # inner where keeps the division finite, the outer one discards it.
    extrapolation = jnp.where(second_order, 0.5 * h / jnp.where(second_order, h_previous, 1.0), 0.0)
    data_prediction = x0 + extrapolation * (x0 - previous_x0)
    sigma_ratio = jnp.sqrt((1.0 - alpha_bar_next) / (1.0 - alpha_bar_t))
    return sigma_ratio * x_t - jnp.sqrt(alpha_bar_next) * jnp.expm1(-h) * data_prediction


def _second_order_steps(num_steps: int, set_alpha_to_one: bool) -> jax.Array:
    """Which steps of DPM-Solver++(2M) are second order: all but the first and maybe the last."""
    step = jnp.arange(num_steps)
    second_order_final = (
        not set_alpha_to_one and num_steps >= _DPM_SOLVER_SECOND_ORDER_FINAL_MIN_STEPS
    )
    return (step > 0) & ((step < num_steps - 1) | second_order_final)


def sampler_timesteps(
    num_timesteps: int,
    sampler: str,
    num_steps: int,
    timestep_spacing: str = "leading",
    steps_offset: int = 1,
) -> np.ndarray:
    """The descending timesteps ``sample`` visits with ``sampler`` (see ``sampling_timesteps``).

    Raises:
        ValueError: If a name or number is outside what is allowed.
    """
    validate_choice("sampler", sampler, SAMPLERS)
    return sampling_timesteps(
        num_timesteps,
        num_steps,
        timestep_spacing,
        steps_offset,
        drop_last_grid_point=sampler == _DPM_SOLVER,
    )


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
    steps_offset: int = 1,
    set_alpha_to_one: bool = True,
    clip_x0: float | None = None,
    start_step: int = 0,
    step_hook: StepHook | None = None,
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
        num_steps: Number of denoising steps, in [1, T] (static); "dpmpp_2m" with the
            "leading" or "linspace" spacing takes at most T − 1.
        eta: DDIM's η in [0, 1] (static); ignored by the other samplers.
        prediction_type: What ``denoise_fn`` predicts, one of ``PREDICTION_TYPES`` (static).
        timestep_spacing: One of ``TIMESTEP_SPACINGS`` (static), see ``sampling_timesteps``;
            "dpmpp_2m" lays it out as diffusers' DPM-Solver schedulers do.
        steps_offset: Added to the "leading" timesteps (static); Stable Diffusion uses 1.
        set_alpha_to_one: ᾱ after the last step (static): 1, so the output is the last ẑ_0,
            or, if False, ᾱ_0 of the first training timestep (diffusers' DDIMScheduler with
            set_alpha_to_one=False, Stable Diffusion's setting; DPMSolverMultistepScheduler
            with final_sigmas_type "sigma_min").
        clip_x0: If set, clip ẑ_0 to [−clip_x0, clip_x0] at every step (pixel-space models
            with data in [−1, 1] use 1); ε̂ is re-derived from the clipped ẑ_0.
        start_step: Skip the first ``start_step`` of the ``num_steps`` steps (static), in
            [0, num_steps]: ``x_T`` is then the sample at the first timestep visited,
            ``sampler_timesteps(...)[start_step]`` (image-to-image); ``num_steps`` returns
            ``x_T`` itself. The noise of every step is that of the full run.
        step_hook: ``step_hook(z_next, alpha_bar_next, key)`` rewrites each step's output
            (ᾱ of the step's target noise level, 1 after the last step with
            ``set_alpha_to_one``; a key of its own per step), e.g. inpainting's replacement
            of the known region.

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
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}], got {start_step}")
    timesteps = sampler_timesteps(
        schedule.num_timesteps, sampler, num_steps, timestep_spacing, steps_offset
    )
    alpha_bar = schedule.alphas_cumprod[jnp.asarray(timesteps)]
    final_alpha_bar = jnp.ones((1,)) if set_alpha_to_one else schedule.alphas_cumprod[:1]
    alpha_bar_next = jnp.concatenate([alpha_bar[1:], final_alpha_bar.astype(alpha_bar.dtype)])
    if sampler == _DPM_SOLVER:
        # The first step's "previous" ᾱ is a placeholder: that step is first order.
        alpha_bar_previous = jnp.concatenate([alpha_bar[:1], alpha_bar[:-1]])
        second_order = _second_order_steps(num_steps, set_alpha_to_one) & (
            jnp.arange(num_steps) > start_step
        )
        sampler_inputs = (alpha_bar_previous, second_order)
    else:
        sampler_inputs = noise_std(sampler, alpha_bar, alpha_bar_next, eta)
    batch_size = x_T.shape[0]

    def reverse_step(carry, step):
        x_t, previous_x0 = carry
        t, step_alpha_bar, step_alpha_bar_next, sampler_step_inputs, step_key = step
        t_batch = jnp.full((batch_size,), t, jnp.int32)
        x0, eps = predict_x0_and_eps(
            schedule, prediction_type, denoise_fn(x_t, t_batch), x_t, t_batch
        )
        if clip_x0 is not None:
            x0, eps = predict_x0_and_eps(
                schedule, "x0", jnp.clip(x0, -clip_x0, clip_x0), x_t, t_batch
            )
        if sampler == _DPM_SOLVER:
            step_alpha_bar_previous, second_order = sampler_step_inputs
            x_next = dpm_solver_step(
                x_t,
                x0,
                previous_x0,
                step_alpha_bar,
                step_alpha_bar_next,
                step_alpha_bar_previous,
                second_order,
            )
        else:
            noise = jax.random.normal(step_key, x_t.shape, jnp.float32)
            x_next = denoising_step(x0, eps, step_alpha_bar_next, sampler_step_inputs, noise)
        if step_hook is not None:
            x_next = step_hook(x_next, step_alpha_bar_next, jax.random.fold_in(step_key, 1))
        return (x_next.astype(x_t.dtype), x0.astype(jnp.float32)), None

    steps = (
        jnp.asarray(timesteps),
        alpha_bar,
        alpha_bar_next,
        sampler_inputs,
        jax.random.split(key, num_steps),
    )
    # Every step's inputs are those of the full run, so a late start changes nothing else.
    steps = jax.tree.map(lambda values: values[start_step:], steps)
    initial_x0 = jnp.zeros(x_T.shape, jnp.float32)
    (x_0, _), _ = jax.lax.scan(reverse_step, (x_T, initial_x0), steps)
    return x_0
