"""Full-reference image quality: PSNR and SSIM per image, as pure jnp functions.

Both take two batches of images (B, H, W, C), uint8 or float, compare them in float32 and
return one value per image, so they run under ``jit`` on sharded batches and padded rows
can be dropped afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Identical images have infinite PSNR, which would make every mean over images infinite.
# The mean squared error is floored so that PSNR never exceeds this many decibels.
PSNR_CAP_DB = 100.0

# Wang et al. 2004: Gaussian window sigma 1.5 truncated at 3.5 sigma (radius 5, 11 x 11).
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float_pair(a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{name} compares two batches of images of the same shape (B, H, W, C), "
            f"got {a.shape} and {b.shape}"
        )
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def psnr(a: jax.Array, b: jax.Array, max_value: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB of each image pair, capped at ``PSNR_CAP_DB``.

    Args:
        a: Images (B, H, W, C), uint8 or float.
        b: Images of the same shape.
        max_value: The largest possible pixel value (255 for uint8, 1 or 2 for floats).

    Returns:
        (B,) float32: ``10 log10(max_value**2 / MSE)`` with the MSE over H, W, C floored at
        ``max_value**2 * 10**(-PSNR_CAP_DB / 10)``, so identical images score exactly
        ``PSNR_CAP_DB`` instead of infinity.
    """
    a, b = _as_float_pair(a, b, "psnr")
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    floor = max_value**2 * 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, floor))


def _gaussian_window() -> np.ndarray:
    """The 1-D taps of ``scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5)``."""
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _filter_valid(x: jax.Array) -> jax.Array:
    """Separable Gaussian filter over H and W of (B, H, W, C), keeping only full windows."""
    taps = _gaussian_window()
    height, width = x.shape[1] - SSIM_WINDOW + 1, x.shape[2] - SSIM_WINDOW + 1
    x = sum(w * x[:, k : k + height] for k, w in enumerate(taps))
    return sum(w * x[:, :, k : k + width] for k, w in enumerate(taps))


def ssim(a: jax.Array, b: jax.Array, max_value: float = 255.0) -> jax.Array:
    """Structural similarity (Wang et al. 2004) of each image pair.

    The convention of ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=max_value, channel_axis=-1)``: local
    statistics under an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the SSIM
    map kept where the window lies inside the image, averaged over H, W and C.

    Args:
        a: Images (B, H, W, C), uint8 or float, at least 11 x 11 pixels.
        b: Images of the same shape.
        max_value: The data range (255 for uint8).

    Returns:
        (B,) float32 SSIM values, 1 for identical images.

    Raises:
        ValueError: If the images are smaller than the 11 x 11 window.
    """
    a, b = _as_float_pair(a, b, "ssim")
    height, width = a.shape[1:3]
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels "
            f"(its Gaussian window), got {height} x {width}"
        )
    # Variances are E[x^2] - E[x]^2, a difference of two large numbers in float32; centring
    # the pixels on mid-grey first quarters that rounding error. The means are shifted back
    # for the luminance term, which is not shift-invariant.
    centre = max_value / 2.0
    a, b = a - centre, b - centre
    filtered = _filter_valid(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1))
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = jnp.split(filtered, 5, axis=-1)
    var_a = mean_aa - mean_a * mean_a
    var_b = mean_bb - mean_b * mean_b
    cov_ab = mean_ab - mean_a * mean_b
    mean_a, mean_b = mean_a + centre, mean_b + centre
    c1 = (SSIM_K1 * max_value) ** 2
    c2 = (SSIM_K2 * max_value) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)) / (
        (mean_a * mean_a + mean_b * mean_b + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(ssim_map, axis=(1, 2, 3))
