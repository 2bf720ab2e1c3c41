"""2D RoPE (REFERENCE §3.6): the rotation of adjacent channel pairs, against a float64 NumPy rotation."""

import jax
import numpy as np

from infinity_jax import schedules
from infinity_jax.ops.rope import apply_rope, rope_table


def test_apply_rope_rotates_adjacent_pairs_by_the_table_angles():
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    cos, sin = rope_table(schedule, 16)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, schedule.num_tokens, 3, 16)))
    out = np.asarray(jax.jit(apply_rope)(x, cos, sin))

    a, b = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    c, s = cos[None, :, None].astype(np.float64), sin[None, :, None].astype(np.float64)
    np.testing.assert_allclose(out[..., 0::2], a * c - b * s, atol=2e-6)
    np.testing.assert_allclose(out[..., 1::2], a * s + b * c, atol=2e-6)
    # The first token sits at (0, 0): no rotation. Later tokens are rotated (the table is not the identity).
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-7)
    assert np.abs(out[:, -1] - x[:, -1]).max() > 0.1


def test_apply_rope_gradient_is_the_inverse_rotation():
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    cos, sin = rope_table(schedule, 16)
    g = np.asarray(jax.random.normal(jax.random.key(1), (1, schedule.num_tokens, 2, 16)))
    x = np.zeros_like(g)
    dx = np.asarray(jax.grad(lambda x: (apply_rope(x, cos, sin) * g).sum())(x))
    ga, gb = g[..., 0::2].astype(np.float64), g[..., 1::2].astype(np.float64)
    c, s = cos[None, :, None].astype(np.float64), sin[None, :, None].astype(np.float64)
    np.testing.assert_allclose(dx[..., 0::2], ga * c + gb * s, atol=2e-6)
    np.testing.assert_allclose(dx[..., 1::2], -ga * s + gb * c, atol=2e-6)
