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


def normalized_rope(x: jax.Array, rope, scale: jax.Array | None = None) -> jax.Array:
    """Cosine attention's queries or keys: each head vector scaled to unit length (times `scale`), then rotated.

    A rotation keeps lengths, so the length is taken from x itself and applied after the rotation; the gradient
    is written out (rotation back, then the unit sphere's projection) so that neither pass writes the float32
    unit or rotated vectors for a second kernel to read back: XLA reads x for the small [B, n, H, 1] lengths and
    again for the output.

    Args:
      x: [B, n, H, hd] projected queries or keys.
      rope: (cos, sin), each [n, hd/2], or None (no rotation: VAR).
      scale: [H] per-head multiplier, or None.

    Returns:
      [B, n, H, hd] float32.
    """
    scale = jnp.ones(x.shape[-2], jnp.float32) if scale is None else scale
    return _normalized_rope(x, () if rope is None else tuple(rope), scale)


NORM_EPS = 1e-12  # F.normalize's floor on the length


def _pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., hd] -> its adjacent channel pairs (x[..., 0::2], x[..., 1::2]) in float32, [..., hd/2] each."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    return pairs[..., 0], pairs[..., 1]


def _rotate(a, b, rope: tuple, inverse: bool = False):
    """Pairs (a, b) [B, n, H, hd/2] turned by the rope angles (backwards for the inverse)."""
    if not rope:
        return a, b
    cos, sin = (t[None, :, None, :] for t in rope)
    sin = -sin if inverse else sin
    return a * cos - b * sin, a * sin + b * cos


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], -1)


def _inverse_length(a: jax.Array, b: jax.Array) -> jax.Array:
    """1 / max(|x|, eps) [B, n, H, 1] of the vectors whose pairs are (a, b)."""
    return 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(a * a + b * b, axis=-1, keepdims=True)), NORM_EPS)


@jax.custom_vjp
def _normalized_rope(x, rope, scale):
    a, b = _pairs(x)
    return _interleave(*_rotate(a, b, rope)) * (_inverse_length(a, b) * scale[:, None])


def _normalized_rope_fwd(x, rope, scale):
    return _normalized_rope(x, rope, scale), (x, rope, scale)


def _normalized_rope_bwd(residuals, g):
    # y = s R(x)/|x| gives dx = (s/|x|)(u − x̂⟨x̂, u⟩) with u = Rᵀ dy, and ds = Σ⟨x̂, u⟩ (R is orthogonal). Kept in
    # pairs so that the only interleave is dx's: the reduction reads x and dy directly.
    x, rope, scale = residuals
    a, b = _pairs(x)
    ua, ub = _rotate(*_pairs(g), rope, inverse=True)
    inverse = _inverse_length(a, b)
    along = jnp.sum(a * ua + b * ub, axis=-1, keepdims=True) * inverse  # ⟨x̂, u⟩ [B, n, H, 1]
    # Below the floor the length is the constant eps: no projection.
    along_x = jnp.where(inverse < 1.0 / NORM_EPS, along * inverse, 0.0)
    dx = _interleave(ua - a * along_x, ub - b * along_x) * (inverse * scale[:, None])
    dscale = jnp.sum(along, axis=(0, 1, 3)).astype(scale.dtype)
    return dx.astype(x.dtype), jax.tree.map(jnp.zeros_like, rope), dscale


_normalized_rope.defvjp(_normalized_rope_fwd, _normalized_rope_bwd)
