"""Attention kernels and the next-scale masks.

Training attends over the whole sequence with the block-causal mask (a token of scale k sees every token of
scales ≤ k, its own scale included). Generation attends the new scale's queries over the KV cache of all scales
so far, which needs no mask. The kernel is `jax.nn.dot_product_attention`: XLA's on every backend, or cuDNN's
fused kernel on NVIDIA GPUs ("cudnn", bf16/fp16 only), picked per call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.schedules import Schedule

IMPLEMENTATIONS = ("xla", "cudnn")
# cuDNN's fused attention with a mask takes sequence lengths in multiples of its tile; shorter ones are padded.
CUDNN_BLOCK = 64


@functools.cache
def block_causal_mask(schedule: Schedule) -> np.ndarray:
    """[L, L] bool: query i may attend key j iff scale(j) <= scale(i)."""
    ids = schedule.scale_ids()
    return ids[:, None] >= ids[None, :]


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    mask: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Softmax attention.

    Args:
      query: [B, T, H, D]; key, value: [B, S, H, D].
      scale: multiplies q·k before the softmax.
      mask: bool, broadcastable to [B, H, T, S]; True = attend. Rows need at least one True.
      kv_lengths: [B] int32, attend to the first kv_lengths[b] keys only (padding; cuDNN takes this, not a
        [B, 1, 1, S] mask).
      implementation: "xla" or "cudnn".

    Returns:
      [B, T, H, D] in the query's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    dtype = query.dtype
    key, value = key.astype(dtype), value.astype(dtype)
    length = query.shape[1]
    if mask is not None:
        mask = jnp.asarray(mask, bool)
    restricted = mask is not None or kv_lengths is not None
    if implementation == "cudnn" and restricted and (length % CUDNN_BLOCK or key.shape[1] % CUDNN_BLOCK):
        query, key, value, mask = _pad(query, key, value, mask, CUDNN_BLOCK)
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=scale, key_value_seq_lengths=kv_lengths, implementation=implementation
    )
    return out[:, :length]


def _pad(query, key, value, mask, multiple: int):
    """Pads the sequences to a multiple of `multiple` for cuDNN's masked and variable-length kernels (they reject
    other lengths): padded keys are masked for every query (by `mask`, or by the key lengths, which stay below
    the padding), padded queries see key 0 only (no empty softmax row); their outputs are dropped by the caller."""
    t, s = query.shape[1], key.shape[1]
    pad_t, pad_s = (-t) % multiple, (-s) % multiple
    query = jnp.pad(query, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    key, value = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (key, value))
    if mask is None:
        return query, key, value, None
    mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
    first_key = jnp.arange(s + pad_s) == 0
    mask = mask.at[:, :, t:, :].set(jnp.broadcast_to(first_key, (*mask.shape[:2], pad_t, s + pad_s)))
    return query, key, value, mask
