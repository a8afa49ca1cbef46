"""Samplers against diffusers' DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler.

For the two beta schedules of DDPM and Stable Diffusion and both ε- and v-prediction: the
same timesteps as ``set_timesteps``, the same output of every step for the same float32 x_t,
model output and noise, and, for the deterministic samplers, the same whole trajectory from
``sample`` as diffusers' sampling loop. The model is a fixed function of (x, t), so
DPM-Solver's multistep history is exercised.

diffusers' DDIMScheduler steps from t to t − T // num_steps rather than to the next of its
own timesteps (diffusers issue #12633), which differ for "linspace" (and for "trailing" when
num_steps does not divide T); ``sample`` always steps to the next visited timestep, so the
DDIM cases use the spacings where the two agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldm_jax.diffusion import (
    TIMESTEP_SPACINGS,
    denoising_step,
    dpm_solver_step,
    make_schedule,
    noise_std,
    predict_x0_and_eps,
    sample,
    sampling_timesteps,
)

NUM_TIMESTEPS = 1000
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}
SHAPE = (2, 8, 8, 4)
# Largest difference seen: 6.7e-6, at the first step of the linear schedule, where ᾱ (ours
# accumulated in float64, diffusers' in float32: 4e-7 apart relatively) is divided by
# sqrt(ᾱ_999) = 0.0064. With diffusers' own ᾱ the steps agree within 1.3e-6.
TOLERANCE = 1e-5
DPM_SOLVER_CONFIG = dict(
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    use_karras_sigmas=False,
)


def fake_model(x, t, sin):
    """A fixed smooth function of (x, t), written for NumPy, JAX and torch alike."""
    return 0.9 * x + 0.1 * sin(3.0 * x + t / 150.0)


def numpy_fake_model(x, t):
    # A Python int keeps the output float32 (a NumPy integer scalar would promote it).
    return fake_model(x, int(t), np.sin)


def jax_fake_model(x, t):
    return fake_model(x, t.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.sin)


def schedule_of(betas):
    config = BETAS[betas]
    return make_schedule(
        config["beta_schedule"], NUM_TIMESTEPS, config["beta_start"], config["beta_end"]
    )


def reference_scheduler(scheduler_class, betas, prediction_type, **config):
    return scheduler_class(
        num_train_timesteps=NUM_TIMESTEPS,
        prediction_type=DIFFUSERS_PREDICTION_TYPES[prediction_type],
        **BETAS[betas],
        **config,
    )


def diffusers_step(scheduler, model_output, t, x, **step_options):
    """``scheduler.step`` on NumPy float32 arrays, returning the previous sample."""
    output = scheduler.step(torch.tensor(model_output), int(t), torch.tensor(x), **step_options)
    return output.prev_sample.numpy()


def assert_close(actual, expected):
    actual = np.asarray(actual)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


def step_inputs(rng, x, t):
    """(model output, noise) for a step from x at timestep t."""
    return numpy_fake_model(x, t), rng.standard_normal(SHAPE, dtype=np.float32)


# ---------------------------------------------------------------- schedules and timesteps


@pytest.mark.parametrize("betas", BETAS)
def test_alphas_cumprod_match_diffusers(betas):
    expected = reference_scheduler(DDPMScheduler, betas, "epsilon").alphas_cumprod.numpy()
    # Ours is accumulated in float64 and cast once; diffusers' in float32.
    np.testing.assert_allclose(schedule_of(betas).alphas_cumprod, expected, rtol=2e-6)


STEP_COUNTS = (1, 2, 7, 10, 13, 20, 50, 250, 500, 999)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_ddpm_and_ddim_timesteps_match_diffusers(scheduler_class, spacing, steps_offset):
    scheduler = scheduler_class(timestep_spacing=spacing, steps_offset=steps_offset)
    for num_steps in STEP_COUNTS:
        scheduler.set_timesteps(num_steps)
        np.testing.assert_array_equal(
            sampling_timesteps(NUM_TIMESTEPS, num_steps, spacing, steps_offset),
            scheduler.timesteps.numpy(),
            err_msg=f"num_steps={num_steps}",
        )


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_dpm_solver_timesteps_match_diffusers(spacing, steps_offset):
    scheduler = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    # 999 "leading" steps with offset 1 would reach T in diffusers too.
    for num_steps in STEP_COUNTS[:-1]:
        scheduler.set_timesteps(num_steps)
        np.testing.assert_array_equal(
            sampling_timesteps(
                NUM_TIMESTEPS, num_steps, spacing, steps_offset, drop_last_grid_point=True
            ),
            scheduler.timesteps.numpy(),
            err_msg=f"num_steps={num_steps}",
        )


# ---------------------------------------------------------------------- one step at a time

# (spacing, steps_offset, set_alpha_to_one): Stable Diffusion's DDIM setting and a zero-SNR
# style one; the last step of each goes to its final ᾱ.
DDIM_CASES = [("leading", 1, False), ("trailing", 0, True)]
NUM_STEPS = 10


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("spacing, steps_offset, set_alpha_to_one", DDIM_CASES)
def test_ddim_steps_match_diffusers(
    betas, prediction_type, eta, spacing, steps_offset, set_alpha_to_one
):
    scheduler = reference_scheduler(
        DDIMScheduler,
        betas,
        prediction_type,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    scheduler.set_timesteps(NUM_STEPS)
    schedule = schedule_of(betas)
    timesteps = sampling_timesteps(NUM_TIMESTEPS, NUM_STEPS, spacing, steps_offset)
    final_alpha_bar = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    alpha_bar_next = [*schedule.alphas_cumprod[timesteps[1:]], final_alpha_bar]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    for t, step_alpha_bar_next in zip(timesteps, alpha_bar_next, strict=True):
        model_output, noise = step_inputs(rng, x, t)
        expected = diffusers_step(
            scheduler, model_output, t, x, eta=eta, variance_noise=torch.from_numpy(noise)
        )
        t_batch = jnp.full((SHAPE[0],), t)
        x0, eps = predict_x0_and_eps(schedule, prediction_type, model_output, x, t_batch)
        sigma = noise_std("ddim", schedule.alphas_cumprod[t], step_alpha_bar_next, eta)
        x = np.asarray(denoising_step(x0, eps, step_alpha_bar_next, sigma, noise))
        assert_close(x, expected)


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTION_TYPES)
@pytest.mark.parametrize(
    "spacing, steps_offset", [("leading", 1), ("linspace", 0), ("trailing", 0)]
)
def test_ddpm_steps_match_diffusers(betas, prediction_type, spacing, steps_offset):
    scheduler = reference_scheduler(
        DDPMScheduler,
        betas,
        prediction_type,
        clip_sample=False,
        variance_type="fixed_small",
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    scheduler.set_timesteps(NUM_STEPS)
    schedule = schedule_of(betas)
    timesteps = sampling_timesteps(NUM_TIMESTEPS, NUM_STEPS, spacing, steps_offset)
    alpha_bar_next = [*schedule.alphas_cumprod[timesteps[1:]], 1.0]
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    for seed, (t, step_alpha_bar_next) in enumerate(zip(timesteps, alpha_bar_next, strict=True)):
        model_output = numpy_fake_model(x, t)
        expected = diffusers_step(
            scheduler, model_output, t, x, generator=torch.Generator().manual_seed(seed)
        )
        # The noise DDPMScheduler.step draws from that generator.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).numpy()
        t_batch = jnp.full((SHAPE[0],), t)
        x0, eps = predict_x0_and_eps(schedule, prediction_type, model_output, x, t_batch)
        sigma = noise_std("ddpm", schedule.alphas_cumprod[t], step_alpha_bar_next)
        x = np.asarray(denoising_step(x0, eps, step_alpha_bar_next, sigma, noise))
        assert_close(x, expected)


# (spacing, steps_offset, final_sigmas_type, num_steps): diffusers' default, Stable Diffusion's
# scheduler config, trailing, and the "sigma_min" end (ᾱ_0) with a first- and a second-order
# last step (second order from 15 steps on).
DPM_SOLVER_CASES = [
    ("linspace", 0, "zero", 10),
    ("leading", 1, "zero", 10),
    ("trailing", 0, "zero", 20),
    ("leading", 1, "sigma_min", 10),
    ("linspace", 0, "sigma_min", 16),
]


def dpm_solver_reference(
    betas, prediction_type, spacing, steps_offset, final_sigmas_type, num_steps
):
    scheduler = reference_scheduler(
        DPMSolverMultistepScheduler,
        betas,
        prediction_type,
        final_sigmas_type=final_sigmas_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        **DPM_SOLVER_CONFIG,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTION_TYPES)
@pytest.mark.parametrize("spacing, steps_offset, final_sigmas_type, num_steps", DPM_SOLVER_CASES)
def test_dpm_solver_steps_match_diffusers(
    betas, prediction_type, spacing, steps_offset, final_sigmas_type, num_steps
):
    scheduler = dpm_solver_reference(
        betas, prediction_type, spacing, steps_offset, final_sigmas_type, num_steps
    )
    schedule = schedule_of(betas)
    alpha_bar = schedule.alphas_cumprod
    timesteps = sampling_timesteps(
        NUM_TIMESTEPS, num_steps, spacing, steps_offset, drop_last_grid_point=True
    )
    final_alpha_bar = 1.0 if final_sigmas_type == "zero" else alpha_bar[0]
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    previous_x0 = np.zeros(SHAPE, np.float32)
    for i, t in enumerate(timesteps):
        model_output = numpy_fake_model(x, t)
        expected = diffusers_step(scheduler, model_output, t, x)
        t_batch = jnp.full((SHAPE[0],), t)
        x0, _ = predict_x0_and_eps(schedule, prediction_type, model_output, x, t_batch)
        last = i == num_steps - 1
        # First order at the first step (no history) and at a last step to noise level zero,
        # or to ᾱ_0 with fewer than 15 steps (diffusers' lower_order_final).
        second_order = i > 0 and (
            not last or (final_sigmas_type == "sigma_min" and num_steps >= 15)
        )
        x = np.asarray(
            dpm_solver_step(
                x,
                x0,
                previous_x0,
                alpha_bar[t],
                final_alpha_bar if last else alpha_bar[timesteps[i + 1]],
                alpha_bar[timesteps[i - 1]] if i else alpha_bar[t],
                second_order,
            )
        )
        previous_x0 = x0
        assert_close(x, expected)


# ------------------------------------------------------------------- whole trajectories


@functools.cache
def jitted_sample(**static_options):
    """``sample`` with the fake model and the schedule as an argument: one compile per option."""

    def sample_with(schedule, x_T):
        return sample(jax_fake_model, schedule, x_T, jax.random.key(0), **static_options)

    return jax.jit(sample_with)


def diffusers_trajectory(scheduler, x_T, **step_options):
    """diffusers' sampling loop with the fake model, in float32 torch."""
    x = torch.from_numpy(x_T)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t, torch.sin), t, x, **step_options).prev_sample
    return x.numpy()


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTION_TYPES)
@pytest.mark.parametrize("spacing, steps_offset, set_alpha_to_one", DDIM_CASES)
def test_ddim_sample_matches_the_diffusers_loop(
    betas, prediction_type, spacing, steps_offset, set_alpha_to_one
):
    scheduler = reference_scheduler(
        DDIMScheduler,
        betas,
        prediction_type,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    scheduler.set_timesteps(NUM_STEPS)
    x_T = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    sample_fn = jitted_sample(
        sampler="ddim",
        num_steps=NUM_STEPS,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
    )
    assert_close(sample_fn(schedule_of(betas), x_T), diffusers_trajectory(scheduler, x_T, eta=0.0))


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("prediction_type", DIFFUSERS_PREDICTION_TYPES)
@pytest.mark.parametrize("spacing, steps_offset, final_sigmas_type, num_steps", DPM_SOLVER_CASES)
def test_dpm_solver_sample_matches_the_diffusers_loop(
    betas, prediction_type, spacing, steps_offset, final_sigmas_type, num_steps
):
    scheduler = dpm_solver_reference(
        betas, prediction_type, spacing, steps_offset, final_sigmas_type, num_steps
    )
    x_T = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    sample_fn = jitted_sample(
        sampler="dpmpp_2m",
        num_steps=num_steps,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=final_sigmas_type == "zero",
    )
    assert_close(sample_fn(schedule_of(betas), x_T), diffusers_trajectory(scheduler, x_T))
