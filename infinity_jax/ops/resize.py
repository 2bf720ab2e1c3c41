"""Resizing that equals PyTorch's `F.interpolate` for the modes Infinity and VAR use (REFERENCE §10.1, §9).

* `area`: adaptive average pooling. Output cell i averages input cells [floor(i·In/Out), ceil((i+1)·In/Out)),
  which for up-sampling repeats cells (torch's semantics, not a box filter).
* `bilinear`: `align_corners=False`, no antialias. Source coordinate (i + 0.5)·In/Out − 0.5, clamped at 0; the
  right neighbour is clamped at the border.
* `bicubic` (VAR's up-sampling of token maps): `align_corners=False`, no antialias, Keys' kernel with a = −0.75
  over the 4 neighbours floor(s) − 1 … floor(s) + 2 of the unclamped source coordinate s, each index clamped
  to the border (so border pixels are repeated, not mirrored).

`jax.image.resize` differs from both (it antialiases when down-sampling and treats borders differently), so each
axis is resampled by an explicit [Out, In] matrix built on the host from the static shapes. Both modes are
separable, so a 2-D resize is two small matmuls, run at HIGHEST precision so that TPUs and GPUs do not round the
latent to bf16/tf32 on the way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("area", "bilinear", "bicubic")
CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic kernel parameter


@functools.cache
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch's adaptive average pooling along one axis."""
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil without floats
        weights[i, start:end] = 1.0 / (end - start)
    return weights


@functools.cache
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch's linear interpolation (align_corners=False) along one axis."""
    # torch rounds the scale In/Out to float32 but evaluates the source coordinate in one fused step; this
    # reproduces its weights bit for bit.
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0).astype(np.float32)
    lo = src.astype(np.int64)
    hi = lo + (lo < in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0, 1)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[n] fractional offsets -> [n, 4] Keys weights of the neighbours at offsets −1, 0, 1, 2."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.cache
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch's bicubic interpolation (align_corners=False) along one axis."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)  # not clamped, unlike bilinear
    floor = np.floor(src)
    weights = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    taps = _cubic_weights((src - floor).astype(np.float64))
    for offset in range(4):
        index = np.clip(floor.astype(np.int64) - 1 + offset, 0, in_size - 1)
        np.add.at(weights, (rows, index), taps[:, offset])
    return weights.astype(np.float32)


_MATRICES = {"area": area_matrix, "bilinear": bilinear_matrix, "bicubic": bicubic_matrix}


def resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
    """Resizes the two spatial axes of a channels-last array like `torch.nn.functional.interpolate`.

    Args:
      x: [..., H, W, C] (e.g. [B, H, W, d] latents).
      size: (h, w) output size.
      method: "area", "bilinear" or "bicubic" (align_corners=False, no antialias).

    Returns:
      [..., h, w, C] in x's dtype (computed in float32).
    """
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; valid: {', '.join(METHODS)}")
    if x.ndim < 3:
        raise ValueError(f"resize expects [..., H, W, C], got shape {tuple(x.shape)}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize output size must be positive, got {size}")
    in_h, in_w = x.shape[-3], x.shape[-2]
    if (in_h, in_w) == (out_h, out_w):
        return x
    make = _MATRICES[method]
    rows = jnp.asarray(make(in_h, out_h))
    cols = jnp.asarray(make(in_w, out_w))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", rows, x.astype(jnp.float32), precision=hi)
    y = jnp.einsum("pw,...owc->...opc", cols, y, precision=hi)
    return y.astype(x.dtype)


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `interpolate(mode='area')` on [..., H, W, C]."""
    return resize(x, size, "area")


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `interpolate(mode='bilinear', align_corners=False)` on [..., H, W, C]."""
    return resize(x, size, "bilinear")


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `interpolate(mode='bicubic', align_corners=False)` on [..., H, W, C]."""
    return resize(x, size, "bicubic")
