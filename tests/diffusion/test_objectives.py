"""The forward process, targets, their inversion and the min-SNR loss weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    diffusion_loss,
    loss_weight,
    make_schedule,
    predict_x0_and_eps,
    q_sample,
    snr,
    training_target,
)

# ᾱ = 0.8, 0.5, 0.2 give SNR = 4, 1, 0.25: values to check weights by hand.
HAND_ALPHAS_CUMPROD = np.array([0.8, 0.5, 0.2], np.float32)
HAND_SCHEDULE = NoiseSchedule(
    betas=jnp.asarray(1.0 - HAND_ALPHAS_CUMPROD / np.array([1.0, 0.8, 0.5], np.float32)),
    alphas_cumprod=jnp.asarray(HAND_ALPHAS_CUMPROD),
)
HAND_T = jnp.array([0, 1, 2], jnp.int32)


def _batch(shape=(3, 4, 4, 2)):
    x0_key, noise_key = jax.random.split(jax.random.key(0))
    return jax.random.normal(x0_key, shape), jax.random.normal(noise_key, shape)


def test_q_sample_mixes_signal_and_noise_per_example():
    x0, noise = _batch()
    x_t = q_sample(HAND_SCHEDULE, x0, HAND_T, noise)
    for i, alpha_bar in enumerate(HAND_ALPHAS_CUMPROD):
        expected = np.sqrt(alpha_bar) * x0[i] + np.sqrt(1 - alpha_bar) * noise[i]
        np.testing.assert_allclose(x_t[i], expected, rtol=1e-6, atol=1e-6)


def test_v_target_is_the_rotated_noise():
    x0, noise = _batch()
    v = training_target(HAND_SCHEDULE, "v", x0, noise, HAND_T)
    # ᾱ = 0.5 at t = 1: v = sqrt(.5)·(ε − x0).
    np.testing.assert_allclose(v[1], np.sqrt(0.5) * (noise[1] - x0[1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        training_target(HAND_SCHEDULE, "epsilon", x0, noise, HAND_T), noise
    )
    np.testing.assert_array_equal(training_target(HAND_SCHEDULE, "x0", x0, noise, HAND_T), x0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_perfect_prediction_recovers_x0_and_noise(prediction_type):
    schedule = make_schedule()
    x0, noise = _batch()
    t = jnp.array([0, 500, 999], jnp.int32)
    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(schedule, prediction_type, x0, noise, t)
    x0_hat, eps_hat = predict_x0_and_eps(schedule, prediction_type, target, x_t, t)
    # Recovering x0 from ε divides by sqrt(ᾱ_T) ≈ 0.07 at t = 999, so float32 error grows.
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


def test_snr_and_min_snr_weights_at_known_timesteps():
    np.testing.assert_allclose(snr(HAND_SCHEDULE, HAND_T), [4.0, 1.0, 0.25], rtol=1e-6)
    expected = {  # γ = 2: min(SNR, γ) = 2, 1, 0.25.
        "epsilon": [2 / 4, 1.0, 1.0],
        "v": [2 / 5, 1 / 2, 0.25 / 1.25],
        "x0": [2.0, 1.0, 0.25],
    }
    for prediction_type, weights in expected.items():
        np.testing.assert_allclose(
            loss_weight(HAND_SCHEDULE, HAND_T, prediction_type, 2.0), weights, rtol=1e-6
        )
        np.testing.assert_array_equal(
            loss_weight(HAND_SCHEDULE, HAND_T, prediction_type, None), [1.0, 1.0, 1.0]
        )


def test_diffusion_loss_is_the_weighted_mean_squared_error_in_float32():
    x0, noise = _batch()
    target = training_target(HAND_SCHEDULE, "epsilon", x0, noise, HAND_T)
    loss, per_example = diffusion_loss(HAND_SCHEDULE, "epsilon", target, x0, noise, HAND_T)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(per_example, [0.0, 0.0, 0.0])

    # Off by 1 in every element, plus 2 everywhere in the first example: MSE 1, 9, 1.
    offset = jnp.ones_like(target).at[0].set(3.0)
    output = (target + offset).astype(jnp.bfloat16)
    loss, per_example = diffusion_loss(
        HAND_SCHEDULE, "epsilon", output, x0, noise, HAND_T, min_snr_gamma=2.0
    )
    assert loss.dtype == per_example.dtype == jnp.float32
    weights = np.array([0.5, 1.0, 1.0])
    # bfloat16 rounding of the output perturbs each squared error by ~1e-2.
    np.testing.assert_allclose(per_example, weights * [9.0, 1.0, 1.0], rtol=2e-2)
    np.testing.assert_allclose(loss, np.mean(weights * [9.0, 1.0, 1.0]), rtol=2e-2)


def test_unknown_prediction_type_or_gamma_is_a_clear_error():
    x0, noise = _batch()
    with pytest.raises(
        ValueError, match=r"prediction_type must be one of \('epsilon', 'v', 'x0'\)"
    ):
        training_target(HAND_SCHEDULE, "eps", x0, noise, HAND_T)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        predict_x0_and_eps(HAND_SCHEDULE, "sample", x0, x0, HAND_T)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        loss_weight(HAND_SCHEDULE, HAND_T, "v", 0.0)
