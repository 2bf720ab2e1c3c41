"""Fréchet Inception Distance (Heusel et al., 2017) between two sets of features, in float64 numpy.

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the Fréchet distance of Gaussians fitted to the two sets. With fewer
samples than feature dimensions the covariances are singular; as in the reference code, Σ₁ and Σ₂ get ε·I added
when the square root of their product is not finite, and the tiny imaginary part sqrtm leaves is dropped.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features: [N, D] with N ≥ 2 -> (mean [D], unbiased covariance [D, D]), float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"FID statistics need [N, D] features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _as_statistics(x) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, tuple):
        mu, sigma = (np.asarray(a, np.float64) for a in x)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"expected (mu [D], sigma [D, D]), got shapes {mu.shape} and {sigma.shape}")
        return mu, sigma
    return statistics(x)


def fid(real, fake, eps: float = 1e-6) -> float:
    """real, fake: features [N, D] (N ≥ 2) or precomputed (mu [D], sigma [D, D]) tuples -> FID (≥ 0 up to rounding)."""
    mu1, sigma1 = _as_statistics(real)
    mu2, sigma2 = _as_statistics(fake)
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two feature sets differ in dimension: {mu1.size} vs {mu2.size}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(mu1.size)
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)
