"""2D RoPE (REFERENCE §3.6): the rotation of adjacent channel pairs, against a float64 NumPy rotation."""

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax import schedules
from infinity_jax.ops.rope import normalized_rope, rope_table


def _rotate(x, cos, sin):
    """RoPE of REFERENCE §3.6 in float64 NumPy: adjacent pairs (2i, 2i+1) turned by the table's angles."""
    a, b = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    c, s = cos[None, :, None].astype(np.float64), sin[None, :, None].astype(np.float64)
    return np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(x.shape)


def test_normalized_rope_rotates_unit_vectors_by_the_table_angles():
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    cos, sin = rope_table(schedule, 16)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, schedule.num_tokens, 3, 16)))
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    out = np.asarray(jax.jit(normalized_rope)(x, (cos, sin)))
    np.testing.assert_allclose(out, _rotate(x, cos, sin), atol=2e-6)
    # The first token sits at (0, 0): no rotation. Later tokens are rotated (the table is not the identity).
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)
    assert np.abs(out[:, -1] - x[:, -1]).max() > 0.1


def _normalize_then_rotate(x, scale, cos, sin):
    """The official order, in float64 NumPy: F.normalize, the per-head scale, then RoPE."""
    x = x.astype(np.float64)
    return _rotate(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * scale[:, None], cos, sin)


def test_normalized_rope_equals_normalising_before_rotating_and_its_gradient_is_exact():
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    cos, sin = rope_table(schedule, 16)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, schedule.num_tokens, 3, 16)))
    scale = np.array([1.0, 2.5, 4.0], np.float32)
    out = np.asarray(jax.jit(normalized_rope)(x, (cos, sin), scale))
    np.testing.assert_allclose(out, _normalize_then_rotate(x, scale, cos, sin), atol=2e-6)
    assert out.dtype == np.float32

    # The written-out gradient against autodiff of the plain formula (float32), for x and the per-head scale.
    g = jax.random.normal(jax.random.key(3), x.shape)

    def plain(x, scale):
        unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * scale[:, None]
        a, b = unit[..., 0::2], unit[..., 1::2]
        c, s = cos[None, :, None], sin[None, :, None]
        return jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(x.shape)

    ours = jax.grad(lambda x, s: jnp.sum(normalized_rope(x, (cos, sin), s) * g), (0, 1))(x, scale)
    expected = jax.grad(lambda x, s: jnp.sum(plain(x, s) * g), (0, 1))(x, scale)
    np.testing.assert_allclose(ours[0], expected[0], atol=2e-5)
    np.testing.assert_allclose(ours[1], expected[1], rtol=1e-4)
    assert np.abs(np.asarray(ours[0])).max() > 0.1  # not a zero gradient


def test_normalized_rope_without_rotation_and_at_the_zero_vector():
    x = np.zeros((1, 2, 1, 8), np.float32)
    x[0, 1, 0] = np.arange(1, 9)
    out = np.asarray(normalized_rope(x, None))
    np.testing.assert_allclose(out[0, 1, 0], x[0, 1, 0] / np.linalg.norm(x[0, 1, 0]), rtol=1e-6)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    # At zero the length is the floor eps, a constant: the gradient is dy / eps, finite (plain autodiff of the
    # norm gives NaN there; torch's F.normalize gives this).
    g = np.ones_like(x)
    dx = np.asarray(jax.grad(lambda x: jnp.sum(normalized_rope(x, None) * g))(x))
    np.testing.assert_allclose(dx[0, 0], 1e12, rtol=1e-6)
    assert np.isfinite(dx).all()


def test_normalized_rope_keeps_a_bf16_input_gradient_in_bf16():
    x = jax.random.normal(jax.random.key(4), (1, 4, 2, 8), jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum(normalized_rope(x, None) ** 3))(x)
    assert dx.dtype == jnp.bfloat16 and np.isfinite(np.asarray(dx, np.float32)).all()
