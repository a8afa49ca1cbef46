"""PSNR and SSIM against their definitions and a scipy reference of the skimage convention."""

import jax
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ldm_jax.evaluate.image_metrics import PSNR_CAP_DB, psnr, ssim


def _images(seed: int, shape=(2, 24, 20, 3), low=0, high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


def _noisy(images: np.ndarray, std: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def _reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, channel_axis=-1), written out in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_channel = []
    for channel in range(a.shape[-1]):
        x, y = a[..., channel], b[..., channel]

        def blur(z):
            return gaussian_filter(z, sigma=1.5, truncate=3.5)  # radius 5: an 11 x 11 window

        mean_x, mean_y = blur(x), blur(y)
        var_x = blur(x * x) - mean_x**2
        var_y = blur(y * y) - mean_y**2
        cov = blur(x * y) - mean_x * mean_y
        ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
            (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
        )
        per_channel.append(ssim_map[5:-5, 5:-5].mean())  # skimage crops the padded border
    return float(np.mean(per_channel))


def test_psnr_of_a_constant_offset_is_analytic():
    a = _images(0, high=240)
    expected = 20 * np.log10(255.0 / 10.0)
    np.testing.assert_allclose(np.asarray(psnr(a, a + 10)), [expected] * 2, rtol=1e-6)
    # The same on float images in [0, 1] with max_value 1.
    np.testing.assert_allclose(
        np.asarray(psnr(a / 255.0, (a + 10) / 255.0, max_value=1.0)), [expected] * 2, rtol=1e-5
    )


def test_psnr_of_identical_images_is_the_finite_cap():
    a = _images(0)
    np.testing.assert_array_equal(np.asarray(psnr(a, a)), [PSNR_CAP_DB] * 2)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = _images(0)
    np.testing.assert_allclose(np.asarray(ssim(a, a)), 1.0, atol=1e-6)
    scores = [float(ssim(a, _noisy(a, std))[0]) for std in (5, 20, 60)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


@pytest.mark.parametrize("bright", [False, True], ids=["random", "near_white"])
def test_ssim_matches_the_skimage_convention(bright):
    a = _images(2, low=200 if bright else 0)
    b = _noisy(a, 15.0, seed=3)
    got = np.asarray(ssim(a, b))
    expected = [_reference_ssim(x, y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_metrics_run_under_jit():
    a, b = _images(0), _noisy(_images(0), 10.0)
    jitted_psnr, jitted_ssim = jax.jit(psnr), jax.jit(ssim)
    np.testing.assert_allclose(np.asarray(jitted_psnr(a, b)), np.asarray(psnr(a, b)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jitted_ssim(a, b)), np.asarray(ssim(a, b)), atol=1e-6)


def test_ssim_rejects_images_smaller_than_its_window():
    a = _images(0, shape=(1, 10, 32, 3))
    with pytest.raises(ValueError, match=r"at least 11 x 11 pixels.*10 x 32"):
        ssim(a, a)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(_images(0), _images(0, shape=(2, 24, 24, 3)))
