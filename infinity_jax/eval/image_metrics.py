"""Reconstruction metrics on images in [0, 1]: PSNR and SSIM (Wang et al., 2004), per image.

SSIM uses the reference settings: an 11×11 Gaussian window with σ = 1.5 applied without padding ("valid"),
K1 = 0.01, K2 = 0.03, data range 1, averaged over the window positions and the colour channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check(x, y) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two [B, H, W, C] batches of one shape, got {x.shape} and {y.shape}")


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """x, y: [B, H, W, C] in [0, 1] -> [B] dB (inf for identical images)."""
    _check(x, y)
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return -10.0 * jnp.log10(mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """[size, size] float32 weights summing to 1."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    return np.outer(g, g).astype(np.float32) / np.outer(g, g).sum().astype(np.float32)


def ssim(x: jax.Array, y: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """x, y: [B, H, W, C] in [0, 1], H and W ≥ window -> [B] mean SSIM."""
    _check(x, y)
    if min(x.shape[1:3]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {x.shape[1]}x{x.shape[2]}")
    channels = x.shape[-1]
    kernel = jnp.tile(jnp.asarray(gaussian_window(window, sigma))[:, :, None, None], (1, 1, 1, channels))

    def blur(a):  # depthwise: every channel with the same window
        return jax.lax.conv_general_dilated(
            a, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels
        )

    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(index, axis=(1, 2, 3))
