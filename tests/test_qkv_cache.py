"""ops.qkv_cache: a scale's queries and its keys/values written into the cache in one pass, on CPU in Pallas'
interpret mode, against the model's XLA path (bias, `normalized_rope`, cache writes)."""

import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax.ops.qkv_cache import qkv_into_cache
from infinity_jax.ops.rope import normalized_rope


@pytest.mark.parametrize("n, start, rows", [(5, 3, 12), (1, 0, 1), (8, 9, 8)])
def test_queries_keys_and_values_land_where_the_model_puts_them(n, start, rows):
    rng = np.random.default_rng(n)
    b, h, hd, cache_rows = 2, 2, 16, 40
    qkv = jnp.asarray(rng.standard_normal((b, n, 3, h, hd)), jnp.bfloat16)
    q_bias, v_bias = (jnp.asarray(rng.standard_normal((h, hd)), jnp.bfloat16) for _ in range(2))
    scale = jnp.asarray([2.0, 5.0], jnp.float32)
    angles = rng.uniform(0, 6, (n, hd // 2))
    rope = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
    # Rows the scale does not own must come back as they were: NaN (an uninitialized cache) and sevens.
    k_cache = jnp.full((b, cache_rows, h, hd), jnp.nan, jnp.bfloat16)
    v_cache = jnp.full((b, cache_rows, h, hd), 7.0, jnp.bfloat16)
    q, k_cache, v_cache = qkv_into_cache(
        qkv, q_bias, v_bias, scale, *rope, k_cache, v_cache, start=start, rows=rows, interpret=True
    )
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    want_q = normalized_rope(qkv[:, :, 0] + q_bias, rope, scale).astype(jnp.bfloat16)
    np.testing.assert_allclose(f32(q), f32(want_q), atol=2e-2, rtol=1e-2)  # ≤ 1 bf16 ulp: another fused order
    new = slice(start, start + n)
    np.testing.assert_array_equal(f32(k_cache[:, new]), f32(normalized_rope(qkv[:, :, 1], rope).astype(jnp.bfloat16)))
    np.testing.assert_array_equal(f32(v_cache[:, new]), f32(qkv[:, :, 2] + v_bias))
    tail = slice(start + n, start + rows)
    assert np.all(f32(k_cache[:, tail]) == 0) and np.all(f32(v_cache[:, tail]) == 0)
    for before_or_after in (slice(0, start), slice(start + rows, None)):
        assert np.all(np.isnan(f32(k_cache[:, before_or_after]))) and np.all(f32(v_cache[:, before_or_after]) == 7)


def test_shapes_that_do_not_fit_the_cache_are_refused():
    qkv = jnp.zeros((2, 4, 3, 2, 16), jnp.bfloat16)
    args = (jnp.zeros((2, 16)), jnp.zeros((2, 16)), jnp.ones(2), jnp.ones((4, 8)), jnp.zeros((4, 8)))
    cache = jnp.zeros((2, 10, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows 12 must be in \\[4, 7\\]"):
        qkv_into_cache(qkv, *args, cache, cache, start=3, rows=12, interpret=True)
    three_heads = jnp.zeros((2, 4, 3, 3, 16), jnp.bfloat16), jnp.zeros((2, 10, 3, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="3 heads of 16 are not powers of two"):
        qkv_into_cache(three_heads[0], *args, three_heads[1], three_heads[1], start=0, rows=4, interpret=True)
    with pytest.raises(ValueError, match="does not fit the cache"):
        qkv_into_cache(qkv, *args, cache[:, :, :1], cache[:, :, :1], start=0, rows=4, interpret=True)
