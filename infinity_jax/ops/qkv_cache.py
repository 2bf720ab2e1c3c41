"""One generation scale's queries, and its keys and values written into the layer's cache, from one read of the
q·k·v projection (GPU, Pallas/Triton).

Cosine attention normalizes each head's query and key, scales the queries and turns both by RoPE; the values
take their bias; then keys and values land in the KV cache at the scale's rows, followed by zeros up to the end of
cuDNN's last read tile (`CUDNN_READ_TILE`). XLA does this in six kernels per layer: the query and key lengths
(two reductions), the rotation, a small fourth, and the two cache writes. At 1024²'s last scale that is ~131 µs
per layer on an H100 for ~60 µs of traffic, and at the small scales six launches where one does. Here each
program reads whole tokens (every head), so the projection is read once and each output written once.
`interpret=True` runs the same kernel on CPU (how it is tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from infinity_jax.ops.rope import NORM_EPS

# Tokens per program (at most; fewer when a scale has fewer): all heads of 4 tokens are 4 × 2048 channels.
BLOCK_TOKENS = 4


def fits(heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this head layout: Triton's tiles are powers of two (2B: 16 heads of 128)."""
    return all(d & (d - 1) == 0 for d in (heads, head_dim))


def _kernel(qkv_ref, q_bias_ref, v_bias_ref, scale_ref, cos_ref, sin_ref, k_in_ref, v_in_ref,
            q_ref, k_ref, v_ref, *, n: int, start: int, rows: int, tokens: int, heads: int, head_dim: int,
            cache_rows: int):  # fmt: skip
    del k_in_ref, v_in_ref  # aliased to k_ref, v_ref: only the scale's rows (and its zeros) are written
    b, block = pl.program_id(0), pl.program_id(1)
    token = block * tokens + jnp.arange(tokens)  # the scale's token index of each row of this program
    new = token < n  # rows of the scale (the others: zeros of the tail, or past it and not written)
    written = token < rows
    width = heads * head_dim
    source = pl.ds(b * n + block * tokens, tokens)
    target = pl.ds(b * cache_rows + start + block * tokens, tokens)

    def rows_mask(mask, columns: int):
        return jnp.broadcast_to(mask[:, None], (tokens, columns))

    def table(ref):  # RoPE's cos or sin of this program's tokens, [tokens, 1, head_dim/2]
        rope = pltriton.load(ref.at[pl.ds(block * tokens, tokens), :], mask=rows_mask(new, head_dim // 2), other=0.0)
        return rope[:, None, :]

    cos, sin = table(cos_ref), table(sin_ref)

    def pairs(offset: int, bias_ref=None):
        """Channels 0, 2, … and 1, 3, … of one of q, k, v over every head, each [tokens, heads, head_dim/2]
        float32, the bias added in the projection's dtype (as the model adds it)."""
        x = pltriton.load(qkv_ref.at[source, pl.ds(offset, width)], mask=rows_mask(new, width), other=0)
        if bias_ref is not None:
            x = (x + bias_ref[...][None, :]).astype(qkv_ref.dtype)
        return jax.lax.unstack(x.astype(jnp.float32).reshape(tokens, heads, head_dim // 2, 2), axis=-1)

    def normalized_rotated(a, b, scale=None):
        inverse = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(a * a + b * b, axis=-1, keepdims=True)), NORM_EPS)
        if scale is not None:
            inverse = inverse * scale
        return (a * cos - b * sin) * inverse, (a * sin + b * cos) * inverse

    def store(ref, at, pair, mask):
        x = jax.lax.stack(pair, axis=-1).reshape(tokens, width)
        x = jnp.where(rows_mask(new, width), x, 0.0).astype(ref.dtype)
        pltriton.store(ref.at[at, :], x, mask=rows_mask(mask, width))

    scale = scale_ref[...][None, :, None]  # [1, heads, 1]
    store(q_ref, source, normalized_rotated(*pairs(0, q_bias_ref), scale), new)
    store(k_ref, target, normalized_rotated(*pairs(width)), written)
    store(v_ref, target, pairs(2 * width, v_bias_ref), written)


@functools.partial(jax.jit, static_argnames=("start", "rows", "interpret"))
def qkv_into_cache(qkv, q_bias, v_bias, scale, cos, sin, cache_k, cache_v, *, start: int, rows: int,
                   interpret: bool = False):  # fmt: skip
    """Cosine attention's queries and the cache with this scale's keys and values.

    Args:
      qkv: [B, n, 3, H, hd] the projection (no bias), in the cache's dtype.
      q_bias, v_bias: [H, hd]; scale: [H] the queries' multiplier (exp of the capped learned scale).
      cos, sin: [n, hd/2] RoPE of the scale's tokens.
      cache_k, cache_v: [B, L', H, hd] the layer's cache (aliased to the outputs: updated in place).
      start: the scale's first row in the cache; rows: n plus the zero rows to write after them.

    Returns:
      (q [B, n, H, hd] in qkv's dtype, cache_k, cache_v).
    """
    b, n, three, h, hd = qkv.shape
    cache_rows = cache_k.shape[1]
    if three != 3 or cache_k.shape != (b, cache_rows, h, hd) or cache_v.shape != cache_k.shape:
        raise ValueError(f"qkv_into_cache: qkv {qkv.shape} does not fit the cache {cache_k.shape}")
    if not fits(h, hd):
        raise ValueError(f"qkv_into_cache: {h} heads of {hd} are not powers of two (Triton's tiles)")
    if not n <= rows <= cache_rows - start:
        raise ValueError(f"qkv_into_cache: rows {rows} must be in [{n}, {cache_rows - start}]")
    tokens = min(BLOCK_TOKENS, pl.next_power_of_2(rows))
    width = h * hd
    kernel = functools.partial(_kernel, n=n, start=start, rows=rows, tokens=tokens, heads=h, head_dim=hd,
                               cache_rows=cache_rows)  # fmt: skip
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    q, k, v = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b * n, width), qkv.dtype),
            jax.ShapeDtypeStruct((b * cache_rows, width), cache_k.dtype),
            jax.ShapeDtypeStruct((b * cache_rows, width), cache_v.dtype),
        ),
        grid=(b, pl.cdiv(rows, tokens)),
        in_specs=[pl.no_block_spec] * 8,
        out_specs=(pl.no_block_spec,) * 3,
        input_output_aliases={6: 1, 7: 2},
        compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret,
        name="qkv_into_cache",
    )(
        qkv.reshape(b * n, 3 * width),
        q_bias.reshape(width).astype(qkv.dtype),
        v_bias.reshape(width).astype(qkv.dtype),
        f32(scale),
        f32(cos),
        f32(sin),
        cache_k.reshape(b * cache_rows, width),
        cache_v.reshape(b * cache_rows, width),
    )
    return q.reshape(b, n, h, hd), k.reshape(cache_k.shape), v.reshape(cache_v.shape)
