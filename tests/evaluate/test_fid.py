"""FID against scipy's matrix square root, and KID on cases with known values."""

import numpy as np
import pytest
import scipy.linalg

from ldm_jax.evaluate.fid import (
    GaussianStatistics,
    frechet_distance,
    kernel_inception_distance,
    unbiased_mmd2,
)


def _scipy_frechet(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """pytorch-fid's formula: tr(S_a + S_b - 2 sqrtm(S_a S_b)), real part."""
    root = scipy.linalg.sqrtm(a.covariance @ b.covariance).real
    difference = a.mean - b.mean
    return difference @ difference + np.trace(a.covariance + b.covariance - 2 * root)


@pytest.mark.parametrize("num, dim", [(200, 16), (300, 64)])
def test_frechet_distance_matches_scipy_sqrtm(num, dim):
    rng = np.random.default_rng(dim)
    a = GaussianStatistics.of(rng.normal(size=(num, dim)))
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    b = GaussianStatistics.of(rng.normal(size=(num, dim)) @ mixing + 0.3)
    want = _scipy_frechet(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero_and_stays_real_when_singular():
    rng = np.random.default_rng(0)
    few = GaussianStatistics.of(rng.normal(size=(10, 32)))  # rank 9 covariance
    # The 23 zero eigenvalues come out as ~1e-14 whose square roots add up to ~1e-6, on a
    # trace of ~64.
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-5)
    other = GaussianStatistics.of(rng.normal(size=(10, 32)))
    assert np.isfinite(frechet_distance(few, other)) and frechet_distance(few, other) > 0


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    a = GaussianStatistics(np.zeros(3), np.eye(3))
    b = GaussianStatistics(np.array([1.0, 2.0, 2.0]), np.eye(3))
    assert frechet_distance(a, b) == pytest.approx(9.0)


def test_statistics_need_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStatistics.of(np.zeros((1, 4)))


def test_mmd2_of_constant_sets_is_the_kernel_difference():
    # Every row of x is a, every row of y is b: MMD^2 = k(a,a) + k(b,b) - 2 k(a,b) exactly.
    a, b = np.array([1.0, 0.0, 2.0, 1.0]), np.array([0.0, 1.0, 1.0, -1.0])
    kernel = lambda u, v: (u @ v / 4 + 1) ** 3  # noqa: E731
    want = kernel(a, a) + kernel(b, b) - 2 * kernel(a, b)
    got = unbiased_mmd2(np.tile(a, (5, 1)), np.tile(b, (5, 1)))
    assert got == pytest.approx(want)
    assert unbiased_mmd2(np.tile(a, (5, 1)), np.tile(a, (5, 1))) == pytest.approx(0.0, abs=1e-12)


def test_mmd2_matches_the_definition_written_as_loops():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    assert unbiased_mmd2(x, y) == pytest.approx(same / (m * (m - 1)) - 2 * cross / m**2)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * abs(same)


def test_kid_uses_whole_sets_smaller_than_a_subset_and_is_reproducible():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    first = kernel_inception_distance(a, b, num_subsets=3)
    assert first == kernel_inception_distance(a, b, num_subsets=3)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)
