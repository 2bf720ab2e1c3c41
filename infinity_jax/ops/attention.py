"""Attention kernels and the next-scale masks.

Training attends over the whole sequence with the block-causal mask (a token of scale k sees every token of
scales ≤ k, its own scale included). That mask is a key prefix per scale, so training runs one call per large
scale over its prefix (no mask, and none of the masked-out third of the L×L scores) and one masked call for the
small scales (`prefix_attention`). Generation attends the new scale's queries over the KV cache of all
scales so far, which needs no mask. The kernel is `jax.nn.dot_product_attention`: XLA's on every backend, or cuDNN's
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
# cuDNN reads keys and values in whole tiles (128 rows in the Hopper kernels): bounded by key lengths, the rows past
# the length in the last tile are read and masked, and a masked NaN still makes 0·NaN = NaN in the product with the
# values. A KV cache whose unwritten rows are garbage keeps zeros after its written rows up to a multiple of this.
CUDNN_READ_TILE = 256
# In training, a scale of at least this many tokens attends in a call of its own; the smaller scales share one
# masked call, whose few thousand scores cost less than a call (and its backward) per scale.
OWN_CALL_TOKENS = 64


@functools.cache
def block_causal_mask(schedule: Schedule) -> np.ndarray:
    """[L, L] bool: query i may attend key j iff scale(j) <= scale(i)."""
    ids = schedule.scale_ids()
    return ids[:, None] >= ids[None, :]


@functools.cache
def scale_groups(schedule: Schedule) -> tuple[tuple[int, int], ...]:
    """Scale ranges [a, b) of the training attention's calls: the leading scales of fewer than OWN_CALL_TOKENS
    tokens together, then every other scale alone. Queries of scales a..b−1 see keys 0..offsets[b] only."""
    sizes = schedule.tokens_per_scale
    first = next((k for k, n in enumerate(sizes) if n >= OWN_CALL_TOKENS and k > 0), len(sizes))
    return ((0, first), *((k, k + 1) for k in range(first, len(sizes))))


def prefix_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, schedule: Schedule, *, scale: float, implementation: str
) -> jax.Array:
    """Attention under the schedule's block-causal mask, one call per `scale_groups` range.

    A group's queries attend over the key prefix that ends with the group, with a mask only when the group holds
    several scales; the outputs equal those of one call with the [L, L] mask, without computing (and, with cuDNN,
    reading a bias for) the scores the mask removes.

    Args:
      query, key, value: [B, L, H, D], L = schedule.num_tokens.
      scale, implementation: as `attention`.

    Returns:
      [B, L, H, D] in the query's dtype.
    """
    if query.shape[1] != schedule.num_tokens or key.shape[1] != schedule.num_tokens:
        raise ValueError(
            f"block-causal attention needs the whole sequence ({schedule.num_tokens} tokens) as queries and keys, "
            f"got {query.shape[1]} and {key.shape[1]}"
        )
    offsets, mask = schedule.offsets, block_causal_mask(schedule)
    padded_length = _round_up(key.shape[1], CUDNN_BLOCK)
    if implementation == "cudnn":
        pad = ((0, 0), (0, padded_length - key.shape[1]), (0, 0), (0, 0))
        padded_key, padded_value = jnp.pad(key, pad), jnp.pad(value, pad)
    outputs = []
    for a, b in scale_groups(schedule):
        start, end = offsets[a], offsets[b]
        group_mask = jnp.asarray(mask[start:end, :end])[None, None] if b - a > 1 else None
        # With cuDNN a long prefix reads the whole padded keys and values, bounded by a key length: its own padded
        # copy (made again in a rematerialised backward) would cost more than the gradient's zero tail.
        in_place = implementation == "cudnn" and group_mask is None and 2 * _round_up(end, CUDNN_BLOCK) >= padded_length
        if in_place:
            keys, values = _gradient_before(padded_key, end), _gradient_before(padded_value, end)
        else:
            keys, values = key[:, :end], value[:, :end]
        lengths = None
        if implementation == "cudnn" and group_mask is None and (in_place or (end - start) % 2 or end % 2):
            # cuDNN's backward rejects odd lengths; its variable-length call pads them instead.
            lengths = jnp.full(query.shape[:1], end, jnp.int32)
        outputs.append(
            attention(query[:, start:end], keys, values, scale=scale, mask=group_mask, kv_lengths=lengths,
                      implementation=implementation)
        )  # fmt: skip
    return jnp.concatenate(outputs, axis=1)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gradient_before(x: jax.Array, length: int) -> jax.Array:
    """x: [B, S, H, D] unchanged; its gradient is zero from position `length` on. cuDNN does not promise zeros in
    the key/value gradient rows past the key length, and there they would land on other groups' real keys."""
    return x


def _gradient_before_fwd(x, length):
    return x, None


def _gradient_before_bwd(length, _, grad):
    return (jnp.where((jnp.arange(grad.shape[1]) < length)[None, :, None, None], grad, 0),)


_gradient_before.defvjp(_gradient_before_fwd, _gradient_before_bwd)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
