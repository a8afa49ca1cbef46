"""Samplers on Gaussian data, where the optimal denoiser and the sample moments are exact.

Data z_0 ~ N(MEAN, STD²) per dimension. Then z_t ~ N(sqrt(ᾱ)·MEAN, ᾱ·STD² + 1 − ᾱ) and the
optimal predictions are linear in z_t, so every sampler maps N(m, v) to a Gaussian whose
moments a few lines of NumPy can follow step by step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    denoising_step,
    make_schedule,
    noise_std,
    sample,
    sampling_timesteps,
)

MEAN, STD = 0.7, 0.3
SCHEDULE = make_schedule()
SHAPE = (2048, 4)


def optimal_denoiser(prediction_type):
    """The minimum-MSE model for Gaussian data, in the given parameterisation."""

    def denoise_fn(x_t, t):
        alpha_bar = SCHEDULE.alphas_cumprod[t][:, None]
        signal, noise = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
        whitened = (x_t - signal * MEAN) / (alpha_bar * STD**2 + 1 - alpha_bar)
        eps = noise * whitened  # E[ε | z_t]
        x0 = MEAN + signal * STD**2 * whitened  # E[z_0 | z_t]
        return {"epsilon": eps, "x0": x0, "v": signal * eps - noise * x0}[prediction_type]

    return denoise_fn


def exact_moments(sampler, num_steps, eta):
    """Mean and std of the sampler's output from z_T ~ N(0, 1), followed in float64."""
    if sampler == "dpmpp_2m":
        return exact_dpm_solver_moments(num_steps)
    alpha_bar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[sampling_timesteps(1000, num_steps)]
    alpha_bar_prev = np.append(alpha_bar[1:], 1.0)
    mean, variance = 0.0, 1.0
    for a, a_prev in zip(alpha_bar, alpha_bar_prev, strict=True):
        posterior_variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        sigma = {
            "ldm": np.sqrt(1 - a_prev),
            "ddpm": np.sqrt(posterior_variance),
            "ddim": eta * np.sqrt(posterior_variance),
        }[sampler]
        marginal_variance = a * STD**2 + 1 - a
        # z_prev = sqrt(a_prev)·MEAN + gain·(z_t − sqrt(a)·MEAN)/marginal_variance + σ·noise.
        gain = np.sqrt(a_prev * a) * STD**2 + np.sqrt(max(1 - a_prev - sigma**2, 0)) * np.sqrt(
            1 - a
        )
        mean = np.sqrt(a_prev) * MEAN + gain * (mean - np.sqrt(a) * MEAN) / marginal_variance
        variance = (gain / marginal_variance) ** 2 * variance + sigma**2
    return mean, np.sqrt(variance)


def exact_dpm_solver_moments(num_steps):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2) on the Gaussian data, in float64.

    The solver is deterministic and the optimal ẑ_0 is affine in z_t, so z_t stays an affine
    function slope·z_T + offset of z_T ~ N(0, 1): its mean is the offset, its std the slope.
    """
    timesteps = sampling_timesteps(1000, num_steps, drop_last_grid_point=True)
    alpha_bar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[timesteps]
    log_snr = 0.5 * np.log(alpha_bar / (1 - alpha_bar))
    z, previous_x0 = np.array([1.0, 0.0]), None  # (slope, offset)
    for i, a in enumerate(alpha_bar):
        gain = np.sqrt(a) * STD**2 / (a * STD**2 + 1 - a)
        x0 = gain * z + np.array([0.0, MEAN - gain * np.sqrt(a) * MEAN])
        if i == num_steps - 1:  # the last step goes to noise level zero and returns ẑ_0
            return x0[1], abs(x0[0])
        h = log_snr[i + 1] - log_snr[i]
        if previous_x0 is not None:  # second order from the second step on
            x0_extrapolated = x0 + h / (2 * (log_snr[i] - log_snr[i - 1])) * (x0 - previous_x0)
        else:
            x0_extrapolated = x0
        a_next = alpha_bar[i + 1]
        z = np.sqrt((1 - a_next) / (1 - a)) * z + np.sqrt(a_next) * -np.expm1(-h) * x0_extrapolated
        previous_x0 = x0


@functools.cache
def jitted_sample(prediction_type="epsilon", **static_options):
    """``sample`` with the optimal denoiser, compiled once per set of static options."""
    return jax.jit(
        functools.partial(
            sample,
            optimal_denoiser(prediction_type),
            SCHEDULE,
            prediction_type=prediction_type,
            **static_options,
        )
    )


@functools.cache
def sampled(sampler, num_steps, eta, prediction_type="epsilon"):
    noise_key, sampler_key = jax.random.split(jax.random.key(42))
    x_T = jax.random.normal(noise_key, SHAPE)
    sample_fn = jitted_sample(prediction_type, sampler=sampler, num_steps=num_steps, eta=eta)
    return np.asarray(sample_fn(x_T, sampler_key))


SAMPLER_CASES = [
    ("ldm", 50, 0.0),
    ("ddpm", 250, 0.0),
    ("ddim", 50, 0.0),
    ("ddim", 100, 1.0),
    ("dpmpp_2m", 20, 0.0),
    ("dpmpp_2m", 50, 0.0),
]


@pytest.mark.parametrize("sampler, num_steps, eta", SAMPLER_CASES)
def test_sample_moments_match_the_exact_gaussian_recursion(sampler, num_steps, eta):
    samples = sampled(sampler, num_steps, eta)
    mean, std = exact_moments(sampler, num_steps, eta)
    # Sampling error of 8192 values: ~0.003 on the mean, ~0.002 on the std.
    assert abs(samples.mean() - mean) < 0.012
    assert abs(samples.std() - std) < 0.008


# Not "ldm" (below), nor DPM-Solver++ with 20 steps: diffusers' grid then ends at t = 48
# (σ ≈ 0.22) and the last step returns ẑ_0 = E[z_0 | z_48], which keeps only ~80% of this
# narrow data's spread (exactly as the recursion above says).
RECOVERING_CASES = [
    ("ddpm", 250, 0.0),
    ("ddim", 50, 0.0),
    ("ddim", 100, 1.0),
    ("dpmpp_2m", 50, 0.0),
]


@pytest.mark.parametrize("sampler, num_steps, eta", RECOVERING_CASES)
def test_ddpm_ddim_and_dpm_solver_recover_the_data_distribution(sampler, num_steps, eta):
    samples = sampled(sampler, num_steps, eta)
    assert abs(samples.mean() - MEAN) < 0.03
    assert abs(samples.std() - STD) < 0.05


def test_ldm_sampler_recovers_the_mean_but_shrinks_the_spread():
    # Renoising ẑ_0 with fresh noise drops the spread of p(z_0 | z_t) at every step.
    samples = sampled("ldm", 50, 0.0)
    assert abs(samples.mean() - MEAN) < 0.03
    assert samples.std() < 0.7 * STD


@pytest.mark.parametrize("sampler, num_steps", [("ddim", 50), ("dpmpp_2m", 20)])
@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_deterministic_samplers_give_the_same_samples_for_every_parameterisation(
    sampler, num_steps, prediction_type
):
    reference = sampled(sampler, num_steps, 0.0, "epsilon")
    np.testing.assert_allclose(
        sampled(sampler, num_steps, 0.0, prediction_type), reference, atol=1e-4
    )


def test_ddpm_step_is_the_posterior_mean_plus_posterior_noise():
    alpha_bar_t, alpha_bar_prev = 0.3, 0.6
    x0, eps = jax.random.normal(jax.random.key(1), (2, 5))
    x_t = np.sqrt(alpha_bar_t) * x0 + np.sqrt(1 - alpha_bar_t) * eps
    alpha, beta = alpha_bar_t / alpha_bar_prev, 1 - alpha_bar_t / alpha_bar_prev
    posterior_mean = (
        np.sqrt(alpha_bar_prev) * beta * x0 + np.sqrt(alpha) * (1 - alpha_bar_prev) * x_t
    ) / (1 - alpha_bar_t)
    sigma = noise_std("ddpm", jnp.float32(alpha_bar_t), jnp.float32(alpha_bar_prev))
    np.testing.assert_allclose(sigma**2, (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta, rtol=1e-6)
    np.testing.assert_allclose(
        denoising_step(x0, eps, alpha_bar_prev, sigma, jnp.zeros_like(x0)),
        posterior_mean,
        atol=1e-6,
    )
    assert noise_std("ddim", alpha_bar_t, alpha_bar_prev, eta=1.0) == pytest.approx(float(sigma))
    assert noise_std("ldm", alpha_bar_t, alpha_bar_prev) == pytest.approx(np.sqrt(0.4))


def test_stochastic_samplers_use_the_key_and_deterministic_ones_ignore_it():
    x_T = jnp.ones((4, 3))
    outputs = {
        (sampler, seed): jitted_sample(sampler=sampler, num_steps=5)(x_T, jax.random.key(seed))
        for sampler in ("ldm", "ddpm", "ddim", "dpmpp_2m")
        for seed in (0, 1)
    }
    assert not np.allclose(outputs["ldm", 0], outputs["ldm", 1])
    assert not np.allclose(outputs["ddpm", 0], outputs["ddpm", 1])
    np.testing.assert_array_equal(outputs["ddim", 0], outputs["ddim", 1])
    np.testing.assert_array_equal(outputs["dpmpp_2m", 0], outputs["dpmpp_2m", 1])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_clip_x0_bounds_the_prediction_and_the_dtype_is_kept(sampler):
    def overshooting_denoiser(x_t, t):
        return jnp.full(x_t.shape, 10.0, x_t.dtype)

    x_T = jnp.zeros((2, 3), jnp.bfloat16)
    output = sample(
        overshooting_denoiser,
        SCHEDULE,
        x_T,
        jax.random.key(0),
        sampler=sampler,
        num_steps=4,
        prediction_type="x0",
        clip_x0=1.0,
    )
    assert output.dtype == jnp.bfloat16
    np.testing.assert_array_equal(output, np.ones((2, 3)))


def test_jitted_sample_compiles_once_and_matches_eager():
    traces = []

    def counting_denoiser(x_t, t):
        traces.append(t.shape)
        return optimal_denoiser("epsilon")(x_t, t)

    sample_fn = jax.jit(
        functools.partial(sample, counting_denoiser, SCHEDULE, sampler="ddpm", num_steps=20)
    )
    x_T = jax.random.normal(jax.random.key(0), (8, 4))
    jitted = sample_fn(x_T, jax.random.key(1))
    sample_fn(x_T + 1.0, jax.random.key(2))
    assert traces == [(8,)]  # one scan body trace, t has the batch shape
    eager = sample(
        counting_denoiser, SCHEDULE, x_T, jax.random.key(1), sampler="ddpm", num_steps=20
    )
    np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_invalid_sampler_arguments_raise_clear_errors():
    x_T, key = jnp.zeros((1, 2)), jax.random.key(0)
    denoise_fn = optimal_denoiser("epsilon")
    with pytest.raises(
        ValueError, match=r"sampler must be one of \('ldm', 'ddpm', 'ddim', 'dpmpp_2m'\)"
    ):
        sample(denoise_fn, SCHEDULE, x_T, key, sampler="plms")
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample(denoise_fn, SCHEDULE, x_T, key, eta=1.5)
    with pytest.raises(ValueError, match="clip_x0 must be > 0"):
        sample(denoise_fn, SCHEDULE, x_T, key, clip_x0=0.0)
    with pytest.raises(ValueError, match="num_steps must be in"):
        sample(denoise_fn, SCHEDULE, x_T, key, num_steps=0)
    # DPM-Solver lays out num_steps + 1 grid points, which must be distinct timesteps.
    with pytest.raises(ValueError, match="num_steps=1000 repeats timesteps"):
        sample(denoise_fn, SCHEDULE, x_T, key, sampler="dpmpp_2m", num_steps=1000)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sample(denoise_fn, SCHEDULE, x_T, key, prediction_type="score")
