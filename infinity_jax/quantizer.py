"""Bitwise quantization of latents, as pure functions of arrays (REFERENCE §2.4, §2.5, §4).

Layout is channels-last: a latent is [B, H, W, d] with d = the number of bits per token; bit j of a token is the
sign of latent channel j. Nothing here holds state, so every function runs under `jax.jit` and on a batch sharded
over any mesh axis (all work is independent per sample, except the codebook-entropy mean, which is global).

* One scale: BSQ (codes ±1/√d on the unit sphere, straight-through through the L2 normalisation) or LFQ (±1).
* Multi-scale residual quantization: the tokenizer's path. Residuals are area-downsampled to each scale,
  quantized, bilinearly upsampled back and subtracted; the decoder input is the sum of the upsampled codes.
* Bitwise Self-Correction (BSC): the transformer's training targets. Bits of each scale are randomly flipped and
  re-quantized, and every later residual is taken against the *flipped* reconstruction, so the labels teach the
  model to correct earlier mistakes. Inputs of scale k+1 are the bilinear downsampling of the running sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from infinity_jax.ops.patchify import pixel_unshuffle
from infinity_jax.ops.resize import area_resize, bilinear_resize
from infinity_jax.schedules import Schedule

KINDS = ("bsq", "lfq")


class Quantized(NamedTuple):
    """One quantized scale.

    codes: [..., d] float32 code vectors; in the forward pass ±1/√d (BSQ) or ±1 (LFQ), in the backward pass the
      identity with respect to `unit` (straight-through).
    bits: [..., d] int32 in {0, 1}; bit = 1 where the code is positive.
    unit: [..., d] float32, the input after BSQ's L2 normalisation (the input itself for LFQ); aux losses use it.
    """

    codes: jax.Array
    bits: jax.Array
    unit: jax.Array


class MultiScaleQuantized(NamedTuple):
    """Multi-scale residual quantization of a latent.

    bits: per scale k, [B, h_k, w_k, d] int32 labels.
    scales: per scale k, the `Quantized` of the (area-downsampled) residual, for aux losses.
    latent: [B, H, W, d] decoder input, the sum of the bilinearly upsampled codes (straight-through gradients).
    """

    bits: tuple[jax.Array, ...]
    scales: tuple[Quantized, ...]
    latent: jax.Array


class Targets(NamedTuple):
    """Transformer training targets from Bitwise Self-Correction.

    labels: [B, L, d] int32 bits of every scale, scales concatenated, tokens row-major.
    inputs: [B, L - h_1·w_1, d] float32 next-scale input features of scales 2..K (the SOS stands for scale 1).
    """

    labels: jax.Array
    inputs: jax.Array


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown quantizer kind {kind!r}; valid: {', '.join(KINDS)}")


def _check_latent(z: jax.Array, name: str = "latent") -> tuple[int, int, int, int]:
    if z.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, d] (channels last), got shape {tuple(z.shape)}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {z.dtype}")
    return tuple(z.shape)


def _check_schedule(schedule: Schedule | Sequence[tuple[int, int]], grid: tuple[int, int], *, exact: bool):
    scales = schedule.scales if isinstance(schedule, Schedule) else Schedule(tuple(schedule)).scales
    too_big = [(h, w) for h, w in scales if h > grid[0] or w > grid[1]]
    if too_big:
        raise ValueError(f"schedule scales {too_big} are larger than the latent grid {grid[0]}x{grid[1]}")
    if exact and scales[-1] != tuple(grid):
        raise ValueError(
            f"the last scale {scales[-1][0]}x{scales[-1][1]} must equal the latent grid {grid[0]}x{grid[1]} "
            "(encode images at the schedule's pixel size)"
        )
    return scales


def _signs(x: jax.Array) -> jax.Array:
    # sign⁺: exactly zero goes to −1 (bit 0), as the official `where(x > 0, 1, -1)`.
    return jnp.where(x > 0, 1.0, -1.0).astype(jnp.float32)


def quantize(r: jax.Array, kind: str = "bsq") -> Quantized:
    """Quantizes every token of one scale.

    BSQ: u = r / max(‖r‖₂, 1e-12) over the last axis; codes = sign⁺(u)/√d. LFQ: u = r; codes = sign⁺(r).
    Straight-through: codes = u + stop_gradient(hard − u), so d codes / d u is the identity.

    Args:
      r: [..., d] residual tokens.
      kind: "bsq" or "lfq".
    """
    _check_kind(kind)
    if r.ndim < 1 or r.shape[-1] < 1:
        raise ValueError(f"quantize expects [..., d] with d >= 1, got shape {tuple(r.shape)}")
    r = r.astype(jnp.float32)
    if kind == "bsq":
        unit = r / jnp.maximum(jnp.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
        hard = _signs(unit) / math.sqrt(r.shape[-1])
    else:
        unit = r
        hard = _signs(r)
    codes = unit + jax.lax.stop_gradient(hard - unit)
    return Quantized(codes=codes, bits=(hard > 0).astype(jnp.int32), unit=unit)


def bits_to_codes(bits: jax.Array, kind: str = "bsq", d: int | None = None) -> jax.Array:
    """[..., d] bits in {0, 1} -> [..., d] float32 codes: (2·bit − 1)/√d for BSQ, 2·bit − 1 for LFQ."""
    _check_kind(kind)
    if bits.ndim < 1:
        raise ValueError("bits must be [..., d], got a scalar")
    if d is not None and bits.shape[-1] != d:
        raise ValueError(f"bits have {bits.shape[-1]} channels but the quantizer has d={d}")
    if jnp.issubdtype(bits.dtype, jnp.floating):
        raise ValueError(f"bits must be integer or bool, got {bits.dtype}")
    signs = 2.0 * bits.astype(jnp.float32) - 1.0
    return signs / math.sqrt(bits.shape[-1]) if kind == "bsq" else signs


def codes_to_bits(codes: jax.Array) -> jax.Array:
    """[..., d] codes -> [..., d] int32 bits (1 where the code is positive)."""
    return (codes > 0).astype(jnp.int32)


def flatten_scales(per_scale: Sequence[jax.Array]) -> jax.Array:
    """Per-scale [B, h_k, w_k, C] -> [B, Σ h_k·w_k, C], scales concatenated, tokens row-major."""
    return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_scale], axis=1)


def split_scales(tokens: jax.Array, schedule: Schedule) -> tuple[jax.Array, ...]:
    """[B, L, C] -> per-scale [B, h_k, w_k, C]; the inverse of `flatten_scales`."""
    if tokens.ndim != 3 or tokens.shape[1] != schedule.num_tokens:
        raise ValueError(
            f"expected [B, {schedule.num_tokens}, C] for schedule {schedule.name}, got {tuple(tokens.shape)}"
        )
    starts = schedule.offsets
    return tuple(
        tokens[:, starts[k] : starts[k + 1]].reshape(tokens.shape[0], h, w, tokens.shape[-1])
        for k, (h, w) in enumerate(schedule.scales)
    )


def multiscale_quantize(
    z: jax.Array, schedule: Schedule, kind: str = "bsq", flips: Sequence[jax.Array | None] | None = None
) -> MultiScaleQuantized:
    """Residual quantization of a latent over a schedule (the tokenizer path, REFERENCE §2.5).

    For each scale: quantize the area-downsampled residual, upsample its codes bilinearly to the latent grid,
    subtract them (without gradient) from the residual and add them to the decoder input.

    Args:
      z: [B, H, W, d] latent (encoder output).
      schedule: scales no larger than (H, W); a scale equal to (H, W) is quantized without resizing.
      kind: "bsq" or "lfq".
      flips: for tokenizer training, one entry per scale: None, or a bool [B, h_k, w_k, d] mask of bits whose
        codes are negated before they enter the residual and the decoder input, so that the decoder learns to
        decode the sums that a transformer's wrong bits produce. Gradients still pass straight through.
        `bits` and `scales` stay the unflipped quantization.
    """
    _, height, width, _ = _check_latent(z)
    scales = _check_schedule(schedule, (height, width), exact=False)
    flips = [None] * len(scales) if flips is None else list(flips)
    if len(flips) != len(scales):
        raise ValueError(f"need one flip mask (or None) per scale: {len(scales)} scales, {len(flips)} masks")
    residual = z.astype(jnp.float32)
    latent = jnp.zeros_like(residual)
    per_scale = []
    for (h, w), flip in zip(scales, flips, strict=True):
        q = quantize(area_resize(residual, (h, w)), kind)
        codes = q.codes
        if flip is not None:
            flipped = bits_to_codes(q.bits ^ flip.astype(jnp.int32), kind)
            codes = q.unit + jax.lax.stop_gradient(flipped - q.unit)
        upsampled = bilinear_resize(codes, (height, width))
        residual = residual - jax.lax.stop_gradient(upsampled)
        latent = latent + upsampled
        per_scale.append(q)
    return MultiScaleQuantized(bits=tuple(q.bits for q in per_scale), scales=tuple(per_scale), latent=latent)


def bits_to_latent(bits: Sequence[jax.Array], grid: tuple[int, int], kind: str = "bsq") -> jax.Array:
    """Per-scale bits [B, h_k, w_k, d] -> [B, H, W, d]: the sum of their codes upsampled bilinearly to `grid`."""
    if not bits:
        raise ValueError("bits_to_latent needs at least one scale")
    d = bits[0].shape[-1]
    latent = 0.0
    for b in bits:
        if b.ndim != 4:
            raise ValueError(f"per-scale bits must be [B, h, w, d], got shape {tuple(b.shape)}")
        latent = latent + bilinear_resize(bits_to_codes(b, kind, d), grid)
    return latent


def self_correct(
    z: jax.Array,
    schedule: Schedule,
    flips: Sequence[jax.Array | None],
    *,
    kind: str = "bsq",
    requant: bool = True,
    patchify: bool = False,
) -> Targets:
    """Bitwise Self-Correction with given flip masks (REFERENCE §4); `bitwise_self_correction` draws them.

    Per scale k: the residual z − cum (area-downsampled unless k is the last scale) is quantized and its bits are
    the label of scale k. Where flips[k] is set, the bits are XOR-ed with it and (if requant) re-quantized, so the
    reconstruction cum, and with it every later residual and label, carries the errors. The input of scale k+1 is
    cum bilinearly resized to scale k+1.

    Args:
      z: [B, H, W, d] latent; the schedule's last scale must equal (H, W). No gradient flows into the targets.
      schedule: the tokenizer-level schedule (for `patchify`, the f8 grids: twice the transformer's).
      flips: one entry per scale: None, or a bool/int [B, h_k, w_k, d] mask of bits to flip.
      kind: "bsq" or "lfq".
      requant: re-quantize from the flipped bits (the released setting); if False, flips change nothing.
      patchify: 2×2 pixel-unshuffle labels and inputs to 4·d channels (the Infinity-8B layout).

    Returns:
      Targets(labels [B, L, d'], inputs [B, L − h_1·w_1, d']) with d' = 4·d and grids halved if patchify.
    """
    b, height, width, d = _check_latent(z)
    scales = _check_schedule(schedule, (height, width), exact=True)
    if len(flips) != len(scales):
        raise ValueError(f"need one flip mask (or None) per scale: {len(scales)} scales, {len(flips)} masks")
    if patchify and any(h % 2 or w % 2 for h, w in scales):
        raise ValueError(f"patchify needs every grid even (the f8 grids are twice the transformer's), got {scales}")
    raw = jax.lax.stop_gradient(z.astype(jnp.float32))
    cum = jnp.zeros_like(raw)
    labels, inputs = [], []
    for k, (h, w) in enumerate(scales):
        last = k == len(scales) - 1
        residual = raw - cum if last else area_resize(raw - cum, (h, w))
        q = quantize(residual, kind)
        labels.append(q.bits)
        codes = q.codes
        if flips[k] is not None:
            if tuple(flips[k].shape) != (b, h, w, d):
                raise ValueError(f"flip mask of scale {k} must be {(b, h, w, d)}, got {tuple(flips[k].shape)}")
            if requant:
                codes = bits_to_codes(q.bits ^ flips[k].astype(jnp.int32), kind)
        cum = cum + bilinear_resize(codes, (height, width))
        if not last:
            inputs.append(bilinear_resize(cum, scales[k + 1]))
    if patchify:
        labels = [pixel_unshuffle(x) for x in labels]
        inputs = [pixel_unshuffle(x) for x in inputs]
    return Targets(labels=flatten_scales(labels), inputs=flatten_scales(inputs))


def flip_masks(
    key: jax.Array,
    batch: int,
    schedule: Schedule,
    d: int,
    strength: float,
    num_flip_scales: int | None = None,
) -> list[jax.Array | None]:
    """Random BSC flip masks: per scale one probability p ~ U{0, 0.01, …, strength}, then bits flip with prob p.

    The probability is shared by the batch (as the official per-step numpy draw); scales from `num_flip_scales`
    on get None (None or a negative number: flip every scale). The official draw truncates 100·strength + 1, so strength 0.29 would top out at 0.28; we round.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"BSC strength must be in [0, 1], got {strength}")
    if num_flip_scales is None or num_flip_scales < 0:
        num_flip_scales = schedule.num_scales
    key_p, key_mask = jax.random.split(key)
    # Two draws for all scales rather than two per scale: fewer random kernels to compile and to launch.
    probs = 0.01 * jax.random.randint(key_p, (schedule.num_scales,), 0, round(100 * float(strength)) + 1)
    uniform = split_scales(jax.random.uniform(key_mask, (batch, schedule.num_tokens, d)), schedule)
    return [u < probs[k] if k < num_flip_scales else None for k, u in enumerate(uniform)]


def bitwise_self_correction(
    z: jax.Array,
    schedule: Schedule,
    key: jax.Array,
    *,
    strength: float = 0.3,
    num_flip_scales: int | None = None,
    kind: str = "bsq",
    requant: bool = True,
    patchify: bool = False,
) -> Targets:
    """Training targets with random bit flips (released setting: strength 0.3 on all scales, requant).

    Args:
      z: [B, H, W, d] latent, last scale of `schedule` == (H, W).
      schedule: tokenizer-level schedule.
      key: a `jax.random` key; fold the training step into it so that (key, step) fixes the flips.
      strength: maximum flip probability (0 gives the plain labels).
      num_flip_scales: flip only the first n scales (None or negative: all).
    """
    b, _, _, d = _check_latent(z)
    masks = flip_masks(key, b, schedule, d, strength, num_flip_scales)
    return self_correct(z, schedule, masks, kind=kind, requant=requant, patchify=patchify)


def entropy_penalty(
    unit: jax.Array, inv_temperature: float = 100.0, gamma0: float = 1.0, gamma: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BSQ's soft entropy penalty γ0·H(per sample) − γ·H(codebook), factorised over bits (REFERENCE §2.4).

    p = sigmoid(−4·u·τ/√d) is the soft probability of each bit being 0. The per-sample entropy is low when bits
    are confident; the codebook entropy (of the batch-mean probabilities) is high when all codes are used.

    Args:
      unit: [..., d] normalised tokens (`Quantized.unit`); every leading axis counts as tokens.

    Returns:
      (penalty, per_sample_entropy, codebook_entropy), scalars.
    """
    d = unit.shape[-1]
    p = jax.nn.sigmoid(-4.0 * unit.astype(jnp.float32) / math.sqrt(d) * inv_temperature)
    probs = jnp.stack([p, 1.0 - p], axis=-1)  # [..., d, 2]

    def entropy(pr):
        return -jnp.sum(pr * jnp.log(pr + 1e-8), axis=-1)

    per_sample = jnp.mean(jnp.sum(entropy(probs), axis=-1))
    codebook = jnp.sum(entropy(jnp.mean(probs.reshape(-1, d, 2), axis=0)))
    return gamma0 * per_sample - gamma * codebook, per_sample, codebook


def commitment_loss(q: Quantized) -> jax.Array:
    """mean((u − stop_gradient(codes))²): pulls the encoder towards its codes."""
    return jnp.mean(jnp.square(q.unit - jax.lax.stop_gradient(q.codes)))


def aux_loss(
    q: Quantized,
    commitment_weight: float = 0.25,
    entropy_weight: float = 0.1,
    inv_temperature: float = 100.0,
    zeta: float = 1.0,
) -> jax.Array:
    """The quantizer's auxiliary loss of one scale: 0.25·commit + 0.1·ζ·penalty/τ (REFERENCE §2.4)."""
    penalty, _, _ = entropy_penalty(q.unit, inv_temperature)
    return commitment_weight * commitment_loss(q) + entropy_weight * zeta * penalty / inv_temperature
