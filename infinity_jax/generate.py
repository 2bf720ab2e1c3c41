"""Generation: every scale of one schedule inside one compiled function (REFERENCE §5).

Per scale k: the new tokens go through the blocks against a fixed-size KV cache; the head's logits are divided
by tau_k and, with guidance, mixed as cfg_k·cond + (1 − cfg_k)·uncond; each bit is drawn from its two-way
softmax after top-k/top-p; the bits become codes, the codes are added to the running latent (bilinearly
upsampled to the last grid), and the running latent resized bilinearly to scale k+1 is the next input. The
tokenizer then decodes the latent. The unconditional branch is the learned empty caption cut to each prompt's
length, a negative prompt, or the null class.

`generate` validates its inputs and calls a compiled function cached per (model, schedule, static options), so
changing cfg, tau, prompts or keys does not recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from infinity_jax import editing, quantizer
from infinity_jax.models.transformer import Infinity, MemoryKV, TransformerConfig, init_cache
from infinity_jax.ops.patchify import pixel_shuffle, pixel_unshuffle
from infinity_jax.ops.resize import area_resize, bilinear_resize
from infinity_jax.schedules import Schedule
from infinity_jax.tokenizer import Tokenizer


class Generation(NamedTuple):
    """bits: per scale [B, h, w, bits] int32; latent: [B, H, W, d] on the tokenizer's grid; images: [B, H·s, W·s, 3]
    in [-1, 1] when a tokenizer was given; logits: per scale [B, h·w, bits, 2] (after tau and guidance) on request;
    labels: per scale [B, h, w, bits], the bits of a target latent's residual after the scales drawn so far (given
    `target_latent`; the labels Bitwise Self-Correction trains towards, with the model's own errors as flips)."""

    bits: tuple[jax.Array, ...]
    latent: jax.Array
    images: jax.Array | None
    logits: tuple[jax.Array, ...] | None
    labels: tuple[jax.Array, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Static:
    """What a compiled generation is specialised on (hashable; one compile per distinct value)."""

    config: TransformerConfig
    schedule: Schedule
    batch: int
    guided: bool
    known: bool  # known tokens (teacher forcing, editing) replace the sampled ones where their mask says
    return_logits: bool
    cfg_layer: int = 0
    patchify: bool = False
    progress: bool = False  # report each finished scale to the `on_scale` callbacks (from inside the compiled loop)
    targets: bool = False  # requantize a target latent's residual at every scale (`Generation.labels`)
    uninitialized_cache: bool = False  # `init_cache(uninitialized=True)`: for parameters on one device
    compiler_options: tuple[tuple[str, object], ...] = ()  # XLA options of this compile (`compiler_options`)


_SCALE_CALLBACKS: list[Callable[[int], None]] = []


@contextlib.contextmanager
def on_scale(callback: Callable[[int], None]):
    """Within the block, generations with progress=True call `callback(k)` as scale k finishes (a progress bar)."""
    _SCALE_CALLBACKS.append(callback)
    try:
        yield
    finally:
        _SCALE_CALLBACKS.remove(callback)


def _scale_done(k) -> None:
    for callback in list(_SCALE_CALLBACKS):
        callback(int(k))


def report_scale(static: Static, k: int) -> None:
    """Inside a compiled generation: tell the host that scale k is done (ordered; a no-op without progress)."""
    if static.progress:
        io_callback(_scale_done, None, jnp.int32(k), ordered=True)


def sample_bits(uniform: jax.Array, logits: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
    """Draws every bit from its two-way logits (REFERENCE §5.3).

    top_k = 1 keeps only the likelier value (greedy); top_k >= 2 changes nothing for two classes. top_p > 0
    removes the less likely value wherever its probability is <= 1 − top_p (never the likelier one), so a small
    top_p is greedy and the released 0.97 makes bits with a minority probability <= 0.03 deterministic.

    Args:
      uniform: [...] uniform draws in [0, 1), one per bit (all scales' draws come from one call).
      logits: [..., 2].
      top_k, top_p: numbers or traced scalars (changing them does not recompile).

    Returns:
      [...] int32 in {0, 1}: 1 where uniform < P(bit = 1).
    """
    minority = jnp.argmin(logits, axis=-1)[..., None] == jnp.arange(2)
    p_min = jnp.min(jax.nn.softmax(logits, axis=-1), axis=-1, keepdims=True)
    remove = minority & ((top_k == 1) | ((top_p > 0) & (p_min <= 1.0 - top_p)))
    return (uniform < jax.nn.softmax(jnp.where(remove, -jnp.inf, logits), axis=-1)[..., 1]).astype(jnp.int32)


def _residual_bits(target, latent, grid, last: bool, patchify: bool):
    """The bits of what `latent` still misses of `target` ([B, H, W, d] on the tokenizer grid) at one scale: the
    residual area-downsampled to `grid` (except at the last scale), quantized as the tokenizer's labels."""
    residual = target - latent
    bits = quantizer.quantize(residual if last else area_resize(residual, grid)).bits
    return pixel_unshuffle(bits) if patchify else bits


def _guidance_rows(text, text_mask, labels, negative_text, negative_mask, guided: bool):
    """The conditioning rows: with guidance [cond; uncond] (2·batch rows), the unconditional half the negative
    prompts (padded to a common length), else the prompts again (or the labels) marked in `drop` [2·batch] to
    take the learned empty caption (or the null class). It runs inside the compiled generation because, run
    eagerly before it, its concatenations were launches of their own in every call."""
    if not guided:
        return text, text_mask, labels, None
    if negative_text is not None:
        length = max(text.shape[1], negative_text.shape[1])
        text = jnp.concatenate([_pad_to(text, length), _pad_to(negative_text, length)])
        return text, jnp.concatenate([_pad_to(text_mask, length), _pad_to(negative_mask, length)]), None, None
    batch = (labels if text is None else text).shape[0]
    drop = np.arange(2 * batch) >= batch
    if text is not None:
        return jnp.concatenate([text, text]), jnp.concatenate([text_mask, text_mask]), None, drop
    return None, None, jnp.concatenate([labels, labels]), drop


def _generate(params, key, text, text_mask, labels, negative_text, negative_mask, cfg, tau, top_k, top_p, known,
              tokenizer, target, static: Static):  # fmt: skip
    c, schedule, batch = static.config, static.schedule, static.batch
    model = Infinity(c)

    def apply(*args, method, **kwargs):
        return model.apply({"params": params}, *args, method=method, **kwargs)

    rows = _guidance_rows(text, text_mask, labels, negative_text, negative_mask, static.guided)
    condition = apply(*rows, method=Infinity.condition)
    if condition.memory is not None:
        memory_kv = MemoryKV(c).apply({"params": params["blocks"]}, condition.memory)
        condition = condition.replace(memory_kv=memory_kv)
    cache = init_cache(c, condition.cond.shape[0], schedule, static.uninitialized_cache)
    x = apply(condition.cond, method=Infinity.sos)
    vae_schedule = schedule.upsampled(2) if static.patchify else schedule
    latent = 0.0
    all_bits, all_logits, all_labels = [], [], []
    # One draw for every bit of every scale: a random op per scale would cost a compile and a launch each.
    uniforms = jax.random.uniform(key, (batch, schedule.num_tokens, c.bits))
    for k, (h, w) in enumerate(schedule.scales):
        guided_hidden = static.guided and static.cfg_layer < 0
        mix_after = c.depth + static.cfg_layer if guided_hidden else -1  # cfg_layer −n: after block depth − n
        hidden, cache = apply(x, condition, schedule, k, cache, mix_after, cfg[k], method=Infinity.step)
        if static.guided and not guided_hidden:
            logits = apply(hidden, condition.cond, method=Infinity.logits) / tau[k]
            logits = cfg[k] * logits[:batch] + (1.0 - cfg[k]) * logits[batch:]
        else:
            logits = apply(hidden[:batch], condition.cond[:batch], method=Infinity.logits) / tau[k]
        uniform = uniforms[:, schedule.offsets[k] : schedule.offsets[k + 1]]
        bits = sample_bits(uniform, logits, top_k, top_p).reshape(batch, h, w, c.bits)
        if static.known:
            bits = jnp.where(known[1][k][..., None], known[0][k], bits)
        if static.targets:
            last = k + 1 == schedule.num_scales
            all_labels.append(_residual_bits(target, latent, vae_schedule.scales[k], last, static.patchify))
        all_bits.append(bits)
        all_logits.append(logits)
        report_scale(static, k)
        codes = quantizer.bits_to_codes(pixel_shuffle(bits) if static.patchify else bits)
        latent = latent + bilinear_resize(codes, vae_schedule.grid)
        if k + 1 < schedule.num_scales:
            nxt = bilinear_resize(latent, vae_schedule.scales[k + 1])
            nxt = pixel_unshuffle(nxt) if static.patchify else nxt
            x = apply(nxt.reshape(batch, -1, c.bits), method=Infinity.embed)
            x = jnp.concatenate([x, x]) if static.guided else x
    if tokenizer is not None and c.compute_dtype != jnp.float32:
        # As the official sampler, which decodes under bf16 autocast (REFERENCE §5.4): the decoder's convolutions
        # in the blocks' compute dtype (latent and images stay float32).
        tokenizer = tokenizer.replace(dtype=c.compute_dtype)
    images = tokenizer.decode_latent(latent) if tokenizer is not None else None
    logits = tuple(all_logits) if static.return_logits else None
    return Generation(tuple(all_bits), latent, images, logits, tuple(all_labels) if static.targets else None)


def for_inference(params, config: TransformerConfig):
    """(params, config) as generation runs them: the blocks' weights in the compute dtype, no rematerialisation.

    The official sampler casts its blocks to bf16 (REFERENCE §5.5); casting once here, rather than inside every
    call, halves the bytes each scale reads and the memory the weights take. Everything outside the blocks
    stays float32. The block layout is the caller's: scanned blocks compile ~4× faster, and on one Hopper GPU their
    gemms read each layer's weights in place in the stacks (`layer_weights="in_place"`) rather than from the copies
    that XLA makes of every layer's slice at every scale; unrolled blocks (each layer's weights and KV cache its own)
    generate ~10 % faster on an H100 (benchmarks/RESULTS.md, 2026-12-06), and on one Hopper GPU run the one-pass
    Pallas kernels around their self-attention (`generation_kernels="pallas"`: 0.2641 s against 0.2665 s for a
    1024² image on an H100, and 77 against 131 µs, 99 against 114 µs per layer at its last scale; RESULTS.md,
    2026-12-07). Neither was measured with the other layout, so each stays with the one it was timed on.
    """
    config = dataclasses.replace(config, remat="none")
    if config.compute_dtype != jnp.float32:
        params = {
            **params,
            "blocks": jax.tree.map(functools.partial(_cast, dtype=config.compute_dtype), params["blocks"]),
        }
        if _on_one_hopper_gpu(params["blocks"]):
            pick = dict(layer_weights="in_place") if config.scan_blocks else dict(generation_kernels="pallas")
            config = dataclasses.replace(config, **pick)
    return params, config


def _cast(x, dtype):
    """`x` in `dtype`; shapes alone (jax.ShapeDtypeStruct, as `infinity_jax.aot` compiles from) stay shapes."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return jnp.asarray(x, dtype)


def _on_one_hopper_gpu(blocks) -> bool:
    """Whether the blocks' weights lie on one Hopper GPU (compute capability 9.x): where the Pallas kernels were
    measured and `ops.layer_matmul`'s tiles fit (their shared memory exceeds an A100's), and where XLA need not
    partition them."""
    device = _one_device(blocks)
    capability = getattr(device, "compute_capability", None)  # CUDA devices only, e.g. "9.0"
    return (
        device is not None
        and device.platform in ("gpu", "cuda")
        and capability is not None
        and capability.split(".")[0] == "9"
    )


def _one_device(tree):
    """The device that holds every array of `tree` (arrays or `jax.ShapeDtypeStruct`s with a sharding), or None."""
    shardings = (getattr(x, "sharding", None) for x in jax.tree.leaves(tree))
    devices = {d for sharding in shardings if sharding is not None for d in sharding.device_set}
    return next(iter(devices)) if len(devices) == 1 else None


# On GPUs, XLA's Triton gemms off: every dot goes to cuBLAS, whose epilogue then takes the FFN's bias and GELU
# (with them on, the GELU after fc1 is a kernel of its own). Measured on an H100 over a 2B block's six gemms at the
# rows of each 1024² scale: cuBLAS alone is faster at 9 of 12 row counts (168 µs per layer at the last scale,
# ~0.37 ms per layer over the 13 scales), even at 8 rows, slower at 2 and 288 (26 and 12 µs); the FFN at 8192
# rows takes 0.721 ms against 0.805. A whole 1024² generation with decode: 0.2665 s against 0.2716–0.2729 s with
# XLA's defaults in earlier calls on the same GPU kind (benchmarks/RESULTS.md, 2026-12-07).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def compiler_options(platform: str) -> dict:
    """The XLA options generation compiles with on `platform` ("gpu", "cpu", …): `GPU_COMPILER_OPTIONS` on GPUs,
    else none."""
    return dict(GPU_COMPILER_OPTIONS) if platform in _GPU_PLATFORMS else {}


@functools.cache
def _compiled(static: Static):
    options = dict(static.compiler_options) or None
    return jax.jit(functools.partial(_generate, static=static), compiler_options=options)


def per_scale(name: str, value, num_scales: int) -> np.ndarray:
    """[num_scales] float32 on the host: jit moves it with the other arguments, not as a transfer of its own."""
    values = np.atleast_1d(np.asarray(value, np.float32))
    if values.ndim != 1 or values.size not in (1, num_scales):
        raise ValueError(f"{name} must be a number or a list of {num_scales} values (one per scale), got {value!r}")
    return np.array(np.broadcast_to(values, (num_scales,)))


def generate(
    params,
    config: TransformerConfig,
    schedule: Schedule,
    key: jax.Array,
    *,
    text=None,
    text_mask=None,
    labels=None,
    negative_text=None,
    negative_mask=None,
    cfg: float | Sequence[float] = 1.0,
    tau: float | Sequence[float] = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    cfg_layer: int = 0,
    tokenizer: Tokenizer | None = None,
    patchify: bool | None = None,
    teacher_bits: Sequence[jax.Array] = (),
    known_bits: Sequence[jax.Array] = (),
    known_masks: Sequence[jax.Array] = (),
    return_logits: bool = False,
    progress: bool = False,
    target_latent: jax.Array | None = None,
    xla_options: dict | None = None,
) -> Generation:
    """Generates one batch for one schedule.

    Args:
      params: the transformer's parameters; config: its layout.
      schedule: the token schedule (any template, any resolution prefix).
      key: a `jax.random` key; the same key gives the same bits.
      text, text_mask: [B, T, Ct5] T5 features and [B, T] bool mask (text models); labels: [B] ints (class models).
      negative_text, negative_mask: [B, T', Ct5] features of a negative prompt for the unconditional branch.
      cfg, tau: guidance weight and temperature, a number or one value per scale. Guidance is on when any
        cfg != 1 (the batch is doubled: cond and uncond).
      top_k, top_p: bit sampling (see `sample_bits`); the released setting is top_p 0.97 (top_k 900 is a no-op).
      cfg_layer: 0 mixes guidance on the logits; −n mixes the hidden states after block depth − n instead.
      tokenizer: decodes the latent into images when given; also fixes `patchify`.
      teacher_bits: ground-truth bits [B, h, w, bits] for the first len(teacher_bits) scales (teacher forcing).
      known_bits, known_masks: for every scale, bits [B, h, w, bits] and a mask [B, h, w] (True: use these bits,
        e.g. `editing.scale_masks` of the region to keep and the image's own bits): zero-shot editing.
      return_logits: also return each scale's logits.
      progress: call the `on_scale` callbacks as each scale finishes.
      target_latent: [B, H, W, d] a latent on the tokenizer's grid (e.g. a held-out image's): also return, per
        scale, the labels of its residual given the scales drawn before (`Generation.labels`), so that a loss
        against them measures the model on its own earlier samples rather than on ground-truth ones.
      xla_options: XLA compiler options of this generation's compile; None: `compiler_options` (measured
        per platform), {}: XLA's defaults.
    """
    Infinity(config).check_schedule(schedule)
    text, text_mask, labels = check_conditioning(config, text, text_mask, labels)
    if tokenizer is not None:
        if tokenizer.config.token_bits != config.bits:
            raise ValueError(
                f"tokenizer gives {tokenizer.config.token_bits} bits per token, the model predicts {config.bits}"
            )
        patchify = tokenizer.config.patchify
    cfg_values = per_scale("cfg", cfg, schedule.num_scales)
    tau_values = per_scale("tau", tau, schedule.num_scales)
    guided = bool(np.any(np.asarray(cfg_values) != 1.0))  # as the official sampler: no cfg, no uncond branch
    if not -config.depth < cfg_layer <= 0:
        raise ValueError(f"cfg_layer must be 0 (guidance on logits) or in [-{config.depth - 1}, -1], got {cfg_layer}")
    batch = (labels if text is None else text).shape[0]
    if not guided:
        negative_text = negative_mask = None  # as the official sampler: no cfg, no uncond branch
    if negative_text is not None:
        if config.cond != "text":
            raise ValueError("negative prompts need a text-conditional model")
        negative_text, negative_mask, _ = check_conditioning(config, negative_text, negative_mask, None)
        if negative_text.shape[0] != batch:
            raise ValueError(f"negative prompts: {negative_text.shape[0]} rows for a batch of {batch}")
    known = known_tokens(teacher_bits, known_bits, known_masks, schedule, batch, (config.bits,), "bits")
    if target_latent is not None:
        grid = (schedule.upsampled(2) if patchify else schedule).grid
        target_latent = jnp.asarray(target_latent, jnp.float32)
        if target_latent.shape[:3] != (batch, *grid):
            raise ValueError(f"target_latent must be [{batch}, {grid[0]}, {grid[1]}, d], got {target_latent.shape}")
    device = _one_device(params)  # walks every parameter: once per call
    # Several devices, or uncommitted arrays: the default backend's.
    platform = jax.default_backend() if device is None else device.platform
    if config.generation_kernels == "pallas" and platform not in _GPU_PLATFORMS:
        raise ValueError(
            f"generation_kernels='pallas' runs Triton kernels, for GPUs; the parameters are on {platform} "
            "('pallas_interpret' runs them on CPU)"
        )
    options = compiler_options(platform) if xla_options is None else xla_options
    static = Static(
        config, schedule, batch, guided, known is not None, return_logits, cfg_layer if guided else 0, bool(patchify),
        progress, target_latent is not None, device is not None, tuple(sorted(options.items())),
    )  # fmt: skip
    sampling = _sampling_setting(
        tuple(cfg_values.tolist()), tuple(tau_values.tolist()), int(top_k), float(top_p), device
    )
    return _compiled(static)(
        params, key, text, text_mask, labels, negative_text, negative_mask, *sampling, known, tokenizer, target_latent
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _sampling_setting(cfg: tuple[float, ...], tau: tuple[float, ...], top_k: int, top_p: float, device):
    """(cfg [K], tau [K], top_k, top_p) on `device` (None: uncommitted), made once per distinct setting: passed as
    host values they were four transfers at the start of every call (~1 ms before a 1024² image's first kernel on
    an H100, benchmarks/RESULTS.md 2026-12-08)."""
    host = (np.asarray(cfg, np.float32), np.asarray(tau, np.float32), np.int32(top_k), np.float32(top_p))
    return jax.device_put(host, device)


def known_tokens(teacher, values, masks, schedule: Schedule, batch: int, tail: tuple[int, ...], what: str):
    """(values, masks) per scale from teacher forcing of the first scales or explicit known tokens; None if neither."""
    if len(teacher) and len(values):
        raise ValueError(f"give teacher {what} or known {what} with masks, not both")
    if len(teacher):
        if len(teacher) > schedule.num_scales:
            raise ValueError(f"{len(teacher)} teacher scales for a schedule of {schedule.num_scales}")
        zeros = [jnp.zeros((batch, *grid, *tail), jnp.int32) for grid in schedule.scales[len(teacher) :]]
        values, masks = (*teacher, *zeros), editing.teacher_masks(batch, schedule, len(teacher))
    if not len(values):
        return None
    return editing.check_known(values, masks, schedule, batch, tail, what)


def _pad_to(x, length):
    """Pads axis 1 (tokens) with zeros (features) or False (masks) to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def check_conditioning(config: TransformerConfig, text, text_mask, labels):
    if config.cond == "text":
        if text is None or text_mask is None:
            raise ValueError("a text-conditional model needs text features [B, T, Ct5] and a text mask [B, T]")
        text, text_mask = jnp.asarray(text, jnp.float32), jnp.asarray(text_mask, bool)
        if text.ndim != 3 or text.shape[-1] != config.text_dim:
            raise ValueError(f"text features must be [B, T, {config.text_dim}], got {tuple(text.shape)}")
        if text.shape[1] > config.text_maxlen:
            raise ValueError(
                f"prompt of {text.shape[1]} tokens is longer than the model's text_maxlen {config.text_maxlen}"
            )
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text mask must be {text.shape[:2]}, got {text_mask.shape}")
        host_mask = np.asarray(text_mask)
        if not bool(host_mask.any(axis=1).all()):
            raise ValueError("every prompt needs at least one token (T5 always emits </s>)")
        if (np.diff(host_mask.astype(np.int8), axis=1) > 0).any():
            raise ValueError("text masks must be True for each caption's tokens and False for the padding after them")
        return text, text_mask, None
    if labels is None:
        raise ValueError("a class-conditional model needs labels [B]")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(f"class ids must be in [0, {config.num_classes}), got {labels.min()}..{labels.max()}")
    return None, None, jnp.asarray(labels, jnp.int32)
