"""Classifier-free guidance: the combination rule and the doubled-batch wrapper."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import classifier_free_guidance, guided_denoise_fn

COND, UNCOND = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))


def test_scale_one_is_conditional_zero_is_unconditional_and_it_is_linear():
    np.testing.assert_allclose(classifier_free_guidance(COND, UNCOND, 1.0), COND, atol=1e-6)
    np.testing.assert_array_equal(classifier_free_guidance(COND, UNCOND, 0.0), UNCOND)
    np.testing.assert_allclose(
        classifier_free_guidance(COND, UNCOND, 7.5), UNCOND + 7.5 * (COND - UNCOND), rtol=1e-6
    )
    # Linear in the scale: the guided output moves by (cond − uncond) per unit of scale.
    step = classifier_free_guidance(COND, UNCOND, 3.0) - classifier_free_guidance(COND, UNCOND, 2.0)
    np.testing.assert_allclose(step, COND - UNCOND, atol=1e-5)


def test_guided_denoise_fn_calls_the_model_once_on_the_doubled_batch():
    calls = []

    def model_fn(x, t):
        calls.append((x.shape, t.shape))
        # A model whose conditional half differs from its null-condition half.
        is_conditional = (jnp.arange(x.shape[0]) < x.shape[0] // 2)[:, None]
        return x * t[:, None] + jnp.where(is_conditional, 1.0, -1.0)

    x = jnp.arange(6.0).reshape(3, 2)
    t = jnp.array([1, 2, 3], jnp.int32)
    guided = guided_denoise_fn(model_fn, 4.0)(x, t)
    assert calls == [((6, 2), (6,))]
    # cond = x·t + 1, uncond = x·t − 1: uncond + 4·2 = x·t + 7.
    np.testing.assert_allclose(guided, x * t[:, None] + 7.0)
    np.testing.assert_allclose(guided_denoise_fn(model_fn, 1.0)(x, t), x * t[:, None] + 1.0)
