"""Distances between two sets of Inception features: FID and KID, in float64 on the host.

FID (Heusel et al., 2017) is the Fréchet distance between Gaussians fitted to the two sets,
``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``. KID (Bińkowski et al., 2018) is the
unbiased estimate of the squared maximum mean discrepancy under the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets, as torch-fidelity computes it.
Both are reported as is (not scaled by 1000 as some papers print KID).
"""

from __future__ import annotations

import dataclasses

import numpy as np

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3


@dataclasses.dataclass(frozen=True)
class GaussianStatistics:
    """The mean (d,) and covariance (d, d) of a feature set, float64."""

    mean: np.ndarray
    covariance: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStatistics:
        """Mean and unbiased (n - 1) covariance of (n, d) features, as pytorch-fid."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(
                f"FID statistics need at least 2 feature vectors (n, d); got {features.shape}"
            )
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix, by its eigenvectors."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """The Fréchet distance between two Gaussians, in float64.

    ``tr((S_a S_b)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of
    the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which has the same eigenvalues as ``S_a S_b``.
    Unlike a general matrix square root of ``S_a S_b``, this stays real and finite when the
    covariances are singular (fewer samples than feature dimensions).
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} and {b.mean.shape}")
    root_a = _psd_sqrt(a.covariance)
    middle = root_a @ b.covariance @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    difference = a.mean - b.mean
    return float(
        difference @ difference + np.trace(a.covariance) + np.trace(b.covariance) - 2 * trace_sqrt
    )


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** KID_DEGREE


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate between two equally large sets under the cubic kernel.

    ``(sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1))
    - 2 sum_{i, j} k(x_i, y_j) / m^2``, torch-fidelity's ``mmd2(..., 'unbiased')``.
    """
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the mean and standard deviation of ``unbiased_mmd2`` over random subsets.

    Each subset draws ``min(subset_size, n_a, n_b)`` rows of each set without replacement.

    Raises:
      ValueError: a set has fewer than 2 rows, or the feature sizes differ.
    """
    features_a = np.asarray(features_a, np.float64)
    features_b = np.asarray(features_b, np.float64)
    if features_a.shape[1:] != features_b.shape[1:] or features_a.ndim != 2:
        raise ValueError(f"feature sets differ in shape: {features_a.shape}, {features_b.shape}")
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set; got {size}")
    rng = np.random.default_rng(seed)
    values = [
        unbiased_mmd2(
            features_a[rng.choice(len(features_a), size, replace=False)],
            features_b[rng.choice(len(features_b), size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
