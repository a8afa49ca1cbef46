"""Noise schedules and sampling timesteps against their defining formulas."""

import numpy as np
import pytest

from ldm_jax.diffusion import SCHEDULE_KINDS, make_schedule, sampling_timesteps


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_alphas_cumprod_is_cumulative_product_and_decreasing(kind):
    schedule = make_schedule(kind)
    betas = np.asarray(schedule.betas, np.float64)
    alphas_cumprod = np.asarray(schedule.alphas_cumprod)
    assert schedule.num_timesteps == 1000
    assert schedule.betas.shape == schedule.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-5, atol=1e-12)
    assert np.all(np.diff(alphas_cumprod) < 0)
    assert np.all((betas > 0) & (betas < 1))


def test_linear_betas_are_evenly_spaced_between_the_endpoints():
    betas = np.asarray(make_schedule("linear", 1000, 1e-4, 0.02).betas, np.float64)
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-3)


def test_scaled_linear_is_evenly_spaced_in_sqrt_beta():
    betas = np.asarray(make_schedule("scaled_linear").betas, np.float64)
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-6)
    step = (0.012**0.5 - 0.00085**0.5) / 999
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), step, rtol=1e-3)


def test_stable_diffusion_schedule_ends_at_the_published_signal_level():
    # sqrt(ᾱ_T) = 0.068265 for Stable Diffusion's schedule (Lin et al. 2024, table 1).
    sqrt_alpha_bar = np.asarray(make_schedule("scaled_linear").sqrt_alphas_cumprod)
    np.testing.assert_allclose(sqrt_alpha_bar[-1], 0.068265, atol=1e-6)
    np.testing.assert_allclose(sqrt_alpha_bar[0], np.sqrt(1 - 0.00085), rtol=1e-6)


def test_cosine_alphas_cumprod_follows_the_squared_cosine():
    schedule = make_schedule("cosine", 1000)
    alpha_bar = np.asarray(schedule.alphas_cumprod)

    def squared_cosine(s):
        return np.cos((s / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2

    # The product of ratios telescopes; only the last beta is capped at 0.999.
    expected = squared_cosine(np.arange(1, 1000)) / squared_cosine(0)
    np.testing.assert_allclose(alpha_bar[:-1], expected, rtol=2e-5, atol=1e-7)
    assert alpha_bar[-1] < 1e-6
    assert float(np.max(schedule.betas)) == pytest.approx(0.999)


def test_sqrt_one_minus_alphas_cumprod_completes_the_unit_variance():
    schedule = make_schedule()
    total = schedule.sqrt_alphas_cumprod**2 + schedule.sqrt_one_minus_alphas_cumprod**2
    np.testing.assert_allclose(np.asarray(total), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "spacing, expected",
    [
        # arange(10) * (1000 // 10), reversed, + steps_offset 1.
        ("leading", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        # round(1000 - arange(10) * 100) - 1.
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        # round(linspace(0, 999, 10)), reversed: the step is exactly 111.
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_sampling_timesteps_match_diffusers_spacings(spacing, expected):
    timesteps = sampling_timesteps(1000, 10, spacing)
    assert timesteps.dtype == np.int32
    np.testing.assert_array_equal(timesteps, expected)


def test_leading_spacing_with_a_remainder_and_no_offset():
    # 1000 // 7 = 142: the leading spacing leaves the top 142 timesteps unvisited.
    np.testing.assert_array_equal(
        sampling_timesteps(1000, 7, "leading", steps_offset=0), [852, 710, 568, 426, 284, 142, 0]
    )


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_every_training_timestep_is_visited_once_with_as_many_steps(spacing):
    np.testing.assert_array_equal(sampling_timesteps(50, 50, spacing), np.arange(50)[::-1])


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"kind must be one of \('linear', 'scaled_linear'"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="beta_start and beta_end"):
        make_schedule("linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="num_timesteps must be >= 1"):
        make_schedule(num_timesteps=0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, num_timesteps=1000\]"):
        sampling_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        sampling_timesteps(1000, 10, "uniform")
    # leading with steps_offset=1 would reach timestep 1000 when every step is visited.
    with pytest.raises(ValueError, match="steps_offset=1"):
        sampling_timesteps(1000, 1000, "leading")
