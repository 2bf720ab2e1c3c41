"""The transformer's training loss (REFERENCE §3.8): per-bit two-way cross entropy, per-scale token weights.

Every bit of every token is a two-class problem (logits [.., d, 2]); a token's loss is the mean over its d bits.
With `reweight_by_scale` a token of scale k weighs sqrt(h_K w_K / h_k w_k), normalised so all weights sum to one:
scale k then carries a share ∝ sqrt(h_k w_k) of the loss instead of ∝ h_k w_k, so coarse scales are not drowned out.
(The official line computing this crashes on a tuple, issue #49; this is the formula it intends.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.schedules import Schedule


def token_weights(schedule: Schedule, reweight_by_scale: bool = True) -> np.ndarray:
    """[L] float32 weights summing to 1: by scale (see the module docstring) or uniform 1/L."""
    counts = np.asarray(schedule.tokens_per_scale, np.float64)
    per_token = np.sqrt(counts[-1] / counts) if reweight_by_scale else np.ones_like(counts)
    weights = np.repeat(per_token, schedule.tokens_per_scale)
    return (weights / weights.sum()).astype(np.float32)


def bit_cross_entropy(logits: jax.Array, bits: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """logits: [B, L, d, 2]; bits: [B, L, d] in {0, 1} -> [B, L] loss per token (mean over bits), float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jax.nn.one_hot(bits.astype(jnp.int32), 2)
    target = target * (1.0 - label_smoothing) + label_smoothing / 2
    return -jnp.mean(jnp.sum(target * log_probs, axis=-1), axis=-1)


def bit_accuracy(logits: jax.Array, bits: jax.Array) -> jax.Array:
    """[B, L, d, 2], [B, L, d] -> [B, L] fraction of bits whose argmax is right."""
    predicted = logits[..., 1] > logits[..., 0]
    return jnp.mean(predicted == bits.astype(bool), axis=-1, dtype=jnp.float32)


def per_scale_mean(values: jax.Array, schedule: Schedule) -> jax.Array:
    """[B, L] -> [K]: the mean over the batch and the tokens of each scale."""
    onehot = jax.nn.one_hot(jnp.asarray(schedule.scale_ids()), schedule.num_scales)  # [L, K]
    return jnp.mean(values, axis=0) @ onehot / jnp.asarray(schedule.tokens_per_scale, jnp.float32)


def next_scale_loss(
    logits: jax.Array,
    bits: jax.Array,
    schedule: Schedule,
    *,
    label_smoothing: float = 0.0,
    reweight_by_scale: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss `mean_B Σ_L w·loss_tok` and its metrics.

    Returns (loss, metrics) with metrics "loss_per_scale" [K] and "acc_per_scale" [K] (unweighted means over each
    scale's tokens, without label smoothing's offset in the accuracy) and "acc" (all bits).
    """
    per_token = bit_cross_entropy(logits, bits, label_smoothing)
    weights = jnp.asarray(token_weights(schedule, reweight_by_scale))
    loss = jnp.mean(jnp.sum(per_token * weights, axis=-1))
    accuracy = bit_accuracy(logits, bits)
    return loss, {
        "loss_per_scale": per_scale_mean(per_token, schedule),
        "acc_per_scale": per_scale_mean(accuracy, schedule),
        "acc": jnp.mean(accuracy),
    }
