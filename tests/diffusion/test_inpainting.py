"""Training-free inpainting and image-to-image: the sampler's start step and step hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    latent_mask,
    make_schedule,
    noised_start,
    replace_known,
    sample,
    sampler_timesteps,
    strength_start_step,
)

SCHEDULE = make_schedule()
SHAPE = (2, 8, 8, 4)
KNOWN = jax.random.normal(jax.random.key(3), SHAPE)


def fake_model(x, t):
    # The spatial mean lets the known region steer the rest, as a U-Net does.
    spatial_mean = x.mean(axis=(1, 2), keepdims=True)
    return 0.9 * x + 0.1 * jnp.sin(3.0 * x + t[:, None, None, None] / 150.0) + 0.1 * spatial_mean


def run(sampler, x_T, **kwargs):
    return jax.jit(
        functools.partial(sample, fake_model, SCHEDULE, sampler=sampler, num_steps=10, **kwargs)
    )(x_T, jax.random.key(0))


def test_latent_mask_regenerates_every_latent_touching_the_mask():
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[0, 3, 5] = 1.0  # one pixel in the latent block (0, 1) of a factor-4 autoencoder
    np.testing.assert_array_equal(latent_mask(mask, 4)[0, :, :, 0], [[0, 1], [0, 0]])
    with pytest.raises(ValueError, match="not divisible"):
        latent_mask(np.zeros((1, 6, 8, 1)), 4)


@pytest.mark.parametrize("sampler", ["ldm", "ddim", "ddpm", "dpmpp_2m"])
def test_replacement_keeps_the_known_region_and_changes_the_rest(sampler):
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[:, 2:6, 2:6] = 1.0
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    out = run(sampler, x_T, step_hook=replace_known(KNOWN, mask))
    known = mask[..., 0] == 0
    # After the last step ᾱ = 1: the known region is the clean latents exactly.
    np.testing.assert_allclose(np.asarray(out)[known], np.asarray(KNOWN)[known], atol=1e-6)
    free = run(sampler, x_T)
    assert np.abs(np.asarray(out - free)[~known]).max() > 1e-3  # the known region steers


def test_hook_sees_every_target_noise_level_in_order():
    seen = []

    def hook(z, alpha_bar, key):
        jax.debug.callback(lambda a: seen.append(float(a)), alpha_bar)
        return z

    run("ddim", jnp.zeros(SHAPE), step_hook=hook, start_step=4)
    jax.effects_barrier()
    timesteps = sampler_timesteps(1000, "ddim", 10)
    expected = [*np.asarray(SCHEDULE.alphas_cumprod)[timesteps[5:]], 1.0]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_strength_counts_steps_as_diffusers():
    assert [strength_start_step(10, s) for s in (1.0, 0.75, 0.5, 0.0)] == [0, 3, 5, 10]
    with pytest.raises(ValueError, match="strength"):
        strength_start_step(10, 1.5)


@pytest.mark.parametrize("sampler", ["ddim", "ldm", "dpmpp_2m"])
def test_a_late_start_is_the_tail_of_the_full_run(sampler):
    """Starting at step k from the full run's z at step k gives the full run's output."""
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    trajectory = []

    def record(z, alpha_bar, key):
        jax.debug.callback(lambda v: trajectory.append(np.asarray(v)), z)
        return z

    full = run(sampler, x_T, step_hook=record)
    jax.effects_barrier()
    start = 4
    tail = run(sampler, jnp.asarray(trajectory[start - 1]), start_step=start)
    tolerance = 1e-5 if sampler != "dpmpp_2m" else None
    if tolerance:
        np.testing.assert_allclose(tail, full, atol=tolerance)
    else:  # the multistep solver restarts at first order: close, not equal
        assert np.abs(np.asarray(tail - full)).max() < 0.1 * np.abs(np.asarray(full)).max()


def test_noised_start_is_noise_at_full_strength_and_the_latents_at_zero():
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    timesteps = sampler_timesteps(1000, "ddim", 10)
    np.testing.assert_array_equal(noised_start(SCHEDULE, KNOWN, noise, timesteps, 0), noise)
    np.testing.assert_array_equal(noised_start(SCHEDULE, KNOWN, noise, timesteps, 10), KNOWN)
    halfway = noised_start(SCHEDULE, KNOWN, noise, timesteps, 5)
    a = SCHEDULE.alphas_cumprod[timesteps[5]]
    np.testing.assert_allclose(halfway, jnp.sqrt(a) * KNOWN + jnp.sqrt(1 - a) * noise, atol=1e-6)
    # Strength 0 runs no step at all.
    np.testing.assert_array_equal(run("ddim", KNOWN, start_step=10), KNOWN)
