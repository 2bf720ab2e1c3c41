"""Block-causal training attention through the TPU splash-attention kernel (Pallas), block-sparse.

The next-scale mask is block lower-triangular by scale, so most (q, kv) tiles of the L×L score matrix are either
entirely visible or entirely masked; splash attention reads the mask's tile structure once (from the schedule, a
static numpy array) and skips masked tiles and the per-element masking of fully visible ones. The sequence is padded
to the kernel's block size: padded keys are hidden from every query, padded queries see only themselves and are
dropped.

Mosaic kernels are not partitioned automatically, so under a mesh the kernel runs inside `jax.shard_map` with the
batch split over ("data", "fsdp") and heads over "tensor" (the activations' own layout). `interpret=True` runs the
same kernel on CPU, which is how its correctness is tested.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from infinity_jax.schedules import Schedule

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def padded_length(length: int, block: int) -> int:
    return -(-length // block) * block


@functools.cache
def padded_block_causal_mask(schedule: Schedule, block: int) -> np.ndarray:
    """[Lp, Lp] bool: the block-causal mask padded to a multiple of `block` (padded queries see themselves)."""
    ids = schedule.scale_ids()
    length, padded = len(ids), padded_length(len(ids), block)
    mask = np.zeros((padded, padded), bool)
    mask[:length, :length] = ids[:, None] >= ids[None, :]
    pad = np.arange(length, padded)
    mask[pad, pad] = True
    return mask


def _kernel(schedule: Schedule, num_heads: int, block: int, interpret: bool):
    # Built per trace, not cached: the kernel holds the mask's tile tables as arrays, which must belong to the
    # trace that uses them (the numpy mask itself is cached).
    mask = splash.MultiHeadMask([splash.NumpyMask(padded_block_causal_mask(schedule, block))] * num_heads)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _attend(q, k, v, schedule: Schedule, block: int, interpret: bool):
    """q, k, v: [b, L, h, D] (one shard) -> [b, L, h, D]."""
    length = q.shape[1]
    pad = padded_length(length, block) - length
    q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for t in (q, k, v))
    out = jax.vmap(_kernel(schedule, q.shape[1], block, interpret))(q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :length]


def block_causal_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    schedule: Schedule,
    *,
    scale: float,
    block: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """Attention under the schedule's block-causal mask.

    Args:
      query, key, value: [B, L, H, D], L = schedule.num_tokens.
      scale: multiplies q·k (applied to q: the kernel does not scale).
      block: the kernel's tile size along the sequence (L is padded to a multiple of it).
      interpret: run the Pallas kernel in interpret mode (CPU).

    Returns:
      [B, L, H, D] in the query's dtype.
    """
    if query.shape[1] != schedule.num_tokens:
        raise ValueError(
            f"splash attention needs the whole sequence ({schedule.num_tokens} tokens), got {query.shape[1]}"
        )
    dtype = query.dtype
    query = (query.astype(jnp.float32) * scale).astype(dtype)
    key, value = key.astype(dtype), value.astype(dtype)
    attend = functools.partial(_attend, schedule=schedule, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return attend(query, key, value)
    spec = jax.P(tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None, None,
                 HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None, None)  # fmt: skip
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        query, key, value
    )
