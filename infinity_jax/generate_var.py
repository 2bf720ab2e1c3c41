"""VAR generation (REFERENCE §9): class-conditional, every scale of one schedule inside one compiled function.

Per scale k: the new tokens go through the blocks against the KV cache; the head's logits over the V codebook
entries are divided by tau_k and, with guidance, mixed as w_k·cond + (1 − w_k)·uncond (the unconditional half is
the null class); an index is drawn after top-k/top-p; its codebook entry, bicubically upsampled and passed through
φ, is added to f̂, and f̂ area-resized to scale k+1 is the next input. The VQ-VAE then decodes f̂.

VAR's guidance grows over the scales: the official `cfg` c gives w_k = 1 + c·k/(K − 1) (`var_guidance`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.generate import Static, check_conditioning, known_tokens, per_scale, report_scale
from infinity_jax.models.transformer import Infinity, TransformerConfig, init_cache
from infinity_jax.models.vqvae import VQTokenizer
from infinity_jax.ops.resize import area_resize
from infinity_jax.schedules import Schedule


class VARGeneration(NamedTuple):
    """indices: per scale [B, h, w] int32; f_hat: [B, H, W, Cvae]; images: [B, 16H, 16W, 3] in [-1, 1];
    logits: per scale [B, h·w, V] (after tau and guidance) on request."""

    indices: tuple[jax.Array, ...]
    f_hat: jax.Array
    images: jax.Array
    logits: tuple[jax.Array, ...] | None


def var_guidance(cfg: float, num_scales: int) -> np.ndarray:
    """The official VAR schedule of guidance weights: w_k = 1 + cfg·k/(K − 1), k = 0 … K − 1."""
    return 1.0 + cfg * np.arange(num_scales) / max(num_scales - 1, 1)


def filter_logits(logits: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
    """VAR's top-k then top-p filtering over the last axis (removed entries become −inf).

    top_k > 0 keeps the entries at least as large as the k-th largest; top_p > 0 then removes, from the smallest
    up, entries whose cumulative probability stays <= 1 − top_p, never the largest. Both may be traced.
    """
    v = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, v - 1) * jnp.ones_like(logits[..., :1], jnp.int32), -1)
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    ascending = jnp.sort(logits, axis=-1)
    removed = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1.0 - top_p
    removed = removed.at[..., -1].set(False)
    # The kept entries are a suffix of the ascending order: keep everything from the first kept value up.
    threshold = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where((top_p > 0) & (logits < threshold), -jnp.inf, logits)


def _generate(params, tokenizer: VQTokenizer, key, labels, drop, cfg, tau, top_k, top_p, known, static: Static):
    c, schedule, batch = static.config, static.schedule, static.batch
    model = Infinity(c)

    def apply(*args, method, **kwargs):
        return model.apply({"params": params}, *args, method=method, **kwargs)

    condition = apply(labels=labels, drop=drop, method=Infinity.condition)
    cache = init_cache(c, condition.cond.shape[0], schedule)
    x = apply(condition.cond, method=Infinity.sos)
    f_hat = jnp.zeros((batch, *schedule.grid, tokenizer.config.dim), jnp.float32)
    all_indices, all_logits = [], []
    for k, (h, w) in enumerate(schedule.scales):
        hidden, cache = apply(x, condition, schedule, k, cache, method=Infinity.step)
        logits = apply(hidden, condition.cond, method=Infinity.logits) / tau[k]
        if static.guided:
            logits = cfg[k] * logits[:batch] + (1.0 - cfg[k]) * logits[batch:]
        draw = jax.random.categorical(jax.random.fold_in(key, k), filter_logits(logits, top_k, top_p))
        indices = draw.astype(jnp.int32).reshape(batch, h, w)
        if static.known:
            indices = jnp.where(known[1][k], known[0][k], indices)
        all_indices.append(indices)
        all_logits.append(logits)
        report_scale(static, k)
        f_hat = tokenizer.add_scale(f_hat, tokenizer.lookup(indices), k, schedule)
        if k + 1 < schedule.num_scales:
            nxt = area_resize(f_hat, schedule.scales[k + 1]).reshape(batch, -1, tokenizer.config.dim)
            x = apply(nxt, method=Infinity.embed)
            x = jnp.concatenate([x, x]) if static.guided else x
    logits = tuple(all_logits) if static.return_logits else None
    return VARGeneration(tuple(all_indices), f_hat, tokenizer.decode(f_hat), logits)


@functools.cache
def _compiled(static: Static):
    return jax.jit(functools.partial(_generate, static=static))


def generate_var(
    params,
    config: TransformerConfig,
    tokenizer: VQTokenizer,
    schedule: Schedule,
    key: jax.Array,
    *,
    labels,
    cfg: float | Sequence[float] = 1.5,
    tau: float | Sequence[float] = 1.0,
    top_k: int = 900,
    top_p: float = 0.96,
    teacher_indices: Sequence[jax.Array] = (),
    known_indices: Sequence[jax.Array] = (),
    known_masks: Sequence[jax.Array] = (),
    return_logits: bool = False,
    progress: bool = False,
) -> VARGeneration:
    """Generates one batch of class-conditional images with a VAR transformer and its VQ-VAE.

    Args:
      params, config: the VAR transformer (`TransformerConfig.from_size("var_d16", schedule)` or a converted one).
      tokenizer: the VQ-VAE; schedule: VAR's schedule (`schedules.var_schedule(256)`).
      key: a `jax.random` key; the same key gives the same images.
      labels: [B] class ids.
      cfg: a number c (the official VAR guidance, weights 1 + c·k/(K − 1)) or one weight per scale; guidance is
        on unless every weight is 1. The FID setting of the paper: cfg 1.5, top_k 900, top_p 0.96 (the defaults).
      tau: temperature, a number or one per scale.
      teacher_indices: ground-truth indices [B, h, w] for the first scales (teacher forcing).
      known_indices, known_masks: for every scale, indices [B, h, w] and a mask [B, h, w] (True: use these):
        zero-shot in-/out-painting and class-conditional editing (`editing.scale_masks`, the image's indices).
      progress: call the `generate.on_scale` callbacks as each scale finishes.
      return_logits: also return each scale's (filtered before sampling, returned unfiltered) logits.
    """
    if not config.vocab:
        raise ValueError("generate_var needs a VAR transformer (a codebook head, config.vocab > 0); use generate")
    if config.vocab != tokenizer.config.vocab or config.bits != tokenizer.config.dim:
        raise ValueError(
            f"transformer (vocab {config.vocab}, inputs {config.bits}) and VQ-VAE (vocab {tokenizer.config.vocab}, "
            f"Cvae {tokenizer.config.dim}) do not match"
        )
    Infinity(config).check_schedule(schedule)
    _, _, labels = check_conditioning(config, None, None, labels)
    weights = var_guidance(cfg, schedule.num_scales) if np.ndim(cfg) == 0 else cfg
    cfg_values = per_scale("cfg", weights, schedule.num_scales)
    tau_values = per_scale("tau", tau, schedule.num_scales)
    guided = bool(np.any(np.asarray(cfg_values) != 1.0))
    batch = labels.shape[0]
    drop = None
    if guided:  # the unconditional half: the null class
        labels, drop = jnp.concatenate([labels, labels]), jnp.arange(2 * batch) >= batch
    known = known_tokens(teacher_indices, known_indices, known_masks, schedule, batch, (), "indices")
    static = Static(config, schedule, batch, guided, known is not None, return_logits, progress=progress)
    return _compiled(static)(
        params, tokenizer, key, labels, drop, cfg_values, tau_values, jnp.int32(top_k), jnp.float32(top_p), known
    )
