"""The Fréchet distance between two sets of feature vectors (FID's formula, in any feature space).

For features a [N, d] and b [M, d] with means m_a, m_b and covariances S_a, S_b:
    FD^2 = ||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))
tr((S_a S_b)^(1/2)) is computed as the sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is
symmetric positive semi-definite, so an eigen-decomposition suffices (no complex sqrtm round-off).
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD^2 between the Gaussians fitted to the rows of a [N, d] and b [M, d] (the number FID reports)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
