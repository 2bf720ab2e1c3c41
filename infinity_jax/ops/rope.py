"""2D rotary position embedding of Infinity's self-attention (REFERENCE §3.6).

Each head's channels rotate in adjacent pairs (2i, 2i+1). The first hd/4 pairs turn with the token's row y, the
last hd/4 with its column x, at frequencies ω_j = 10000^(−j/(hd/4)). Positions live on the template's final 1M
grid, whatever the resolution: row r of a scale with h rows sits at round_half_even(r · H_1M/h), computed in
float32 as the official table is, so that converted checkpoints see the positions they were trained with (64 of
the 390 official index vectors differ under round-half-up).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.schedules import Schedule


def scale_positions(size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """[h·w, 2] float32 (y, x) positions of a scale's tokens (row-major) on the position grid."""
    (h, w), (grid_h, grid_w) = size, grid
    ys = np.round(np.arange(h, dtype=np.float32) * np.float32(grid_h / h))
    xs = np.round(np.arange(w, dtype=np.float32) * np.float32(grid_w / w))
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)


@functools.cache
def rope_table(schedule: Schedule, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [L, head_dim/2] float32, for every token of the schedule in sequence order."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = np.float32(1.0) / np.float32(10000.0) ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / (2 * quarter))
    positions = np.concatenate([scale_positions(s, schedule.position_grid) for s in schedule.scales])
    angles = np.concatenate([np.outer(positions[:, 0], inv_freq), np.outer(positions[:, 1], inv_freq)], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent channel pairs.

    Args:
      x: [B, n, H, hd] queries or keys.
      cos, sin: [n, hd/2] angles of the n tokens.

    Returns:
      [B, n, H, hd] float32.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
