"""Guidance rescale (Lin et al. 2023) against diffusers' ``rescale_noise_cfg``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm_jax.diffusion import classifier_free_guidance, guided_denoise_fn, rescale_guidance

COND, UNCOND = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 8, 8, 4)))
COND = COND * np.array([0.5, 1.0, 2.0])[:, None, None, None]  # a different std per example


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.3, 0.7, 1.0])
def test_matches_diffusers(guidance_rescale):
    guided = classifier_free_guidance(COND, UNCOND, 7.5)
    expected = rescale_noise_cfg(
        torch.from_numpy(np.asarray(guided)), torch.from_numpy(COND), guidance_rescale
    ).numpy()
    np.testing.assert_allclose(
        rescale_guidance(guided, COND, guidance_rescale), expected, rtol=1e-5, atol=1e-6
    )


def test_full_rescale_gives_each_example_the_conditional_std():
    guided = classifier_free_guidance(COND, UNCOND, 7.5)
    rescaled = rescale_guidance(guided, COND, 1.0)
    np.testing.assert_allclose(
        jnp.std(rescaled, axis=(1, 2, 3)), np.std(COND, axis=(1, 2, 3)), rtol=1e-5
    )


def test_guided_denoise_fn_rescales_and_checks_the_range():
    def model_fn(x, t):
        return jnp.concatenate([jnp.asarray(COND), jnp.asarray(UNCOND)])

    x, t = jnp.zeros(COND.shape), jnp.zeros((3,), jnp.int32)
    guided = classifier_free_guidance(COND, UNCOND, 5.0)
    np.testing.assert_allclose(
        guided_denoise_fn(model_fn, 5.0, 0.7)(x, t),
        rescale_guidance(guided, COND, 0.7),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(guided_denoise_fn(model_fn, 5.0)(x, t), guided, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_rescale"):
        guided_denoise_fn(model_fn, 5.0, 1.5)
