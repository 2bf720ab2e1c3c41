"""2×2 spatial patchify of the Infinity-8B path (REFERENCE §4, §5.6), channels-last.

The channel order is PyTorch's `pixel_unshuffle`: output channel c·r² + r·dy + dx holds input channel c at
offset (dy, dx) inside the r×r cell, so converted 8B weights see the features where they were trained.
"""

from __future__ import annotations

import jax


def pixel_unshuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """[B, H, W, C] -> [B, H/r, W/r, C·r²] (torch `pixel_unshuffle` order)."""
    if x.ndim != 4:
        raise ValueError(f"pixel_unshuffle expects [B, H, W, C], got shape {tuple(x.shape)}")
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle by {factor} needs H and W divisible by {factor}, got {h}x{w}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, dy, dx]
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """[B, h, w, C·r²] -> [B, h·r, w·r, C], the inverse of `pixel_unshuffle`."""
    if x.ndim != 4:
        raise ValueError(f"pixel_shuffle expects [B, h, w, C·r²], got shape {tuple(x.shape)}")
    b, h, w, cr = x.shape
    if cr % (factor * factor):
        raise ValueError(f"pixel_shuffle by {factor} needs channels divisible by {factor * factor}, got {cr}")
    c = cr // (factor * factor)
    x = x.reshape(b, h, w, c, factor, factor).transpose(0, 1, 4, 2, 5, 3)  # [B, h, dy, w, dx, C]
    return x.reshape(b, h * factor, w * factor, c)
