"""The jitted training step of the transformer, with its targets made on device (DESIGN §3, REFERENCE §3.8, §4).

    images uint8 ─▶ frozen tokenizer encoder ─▶ latent [B, h, w, d]        (or precomputed latents)
      ─▶ multi-scale BSQ with Bitwise Self-Correction (random flips keyed by (seed, step, micro-batch))
      ─▶ inputs [B, L−1, bits], labels [B, L, bits]
    tokens ─▶ frozen T5 encoder ─▶ text [B, T, Ct5]                           (or precomputed features; or labels)
      ─▶ condition dropout (CFG) ─▶ transformer (bf16 compute, fp32 parameters) ─▶ logits [B, L, bits, 2]
      ─▶ per-bit cross entropy with per-scale weights ─▶ gradients, accumulated over micro-batches ─▶ optax

The frozen towers are arguments of the step, not part of the optimizer state, and run under their own sharding
rules. The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from infinity_jax import quantizer
from infinity_jax.models.t5 import T5Config, T5Encoder
from infinity_jax.models.transformer import Infinity, TransformerConfig, init_params
from infinity_jax.schedules import Schedule
from infinity_jax.tokenizer import Tokenizer
from infinity_jax.train import losses


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@struct.dataclass
class Frozen:
    """Parameters that are used but not trained: the tokenizer (None with precomputed latents) and the T5 encoder
    (None for class conditioning or precomputed text features)."""

    tokenizer: Tokenizer | None = None
    text: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about the step (hashable)."""

    model: TransformerConfig
    text: T5Config | None
    text_dtype: str = "bfloat16"
    patchify: bool = False
    bsc_strength: float = 0.3
    bsc_num_flip_scales: int = -1
    bsc_requant: bool = True
    cond_drop_rate: float = 0.1
    label_smoothing: float = 0.0
    reweight_by_scale: bool = True
    grad_accum: int = 1
    seed: int = 0
    rules: tuple = ()
    tokenizer_rules: tuple = ()
    text_rules: tuple = ()


def init_state(step_config: StepConfig, optimizer: optax.GradientTransformation, schedule: Schedule, key):
    """A fresh TrainState with logically-partitioned (boxed) parameters: `jax.eval_shape` it for shardings."""
    c = step_config.model
    batch = 1
    inputs = jnp.zeros((batch, schedule.num_tokens - 1, c.bits))
    if c.cond == "text":
        cond = {"text": jnp.zeros((batch, 1, c.text_dim)), "text_mask": jnp.ones((batch, 1), bool)}
    else:
        cond = {"labels": jnp.zeros((batch,), jnp.int32)}
    params = init_params(c, key, inputs, schedule, **cond)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def encode(step_config: StepConfig, frozen: Frozen, batch: dict, schedule: Schedule):
    """(latent [B, H, W, d] on the tokenizer's grid, the tokenizer-level schedule): from the frozen tokenizer on
    the batch's uint8 images, or the batch's precomputed latents."""
    if "latent" in batch:
        latent = batch["latent"].astype(jnp.float32)
        latent_schedule = schedule.upsampled(2) if step_config.patchify else schedule
    else:
        pixels = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        with nn.logical_axis_rules(step_config.tokenizer_rules):
            latent = frozen.tokenizer.encode(pixels)
        latent_schedule = frozen.tokenizer.latent_schedule(schedule)
    return jax.lax.stop_gradient(latent), latent_schedule


def make_targets(step_config: StepConfig, frozen: Frozen, batch: dict, schedule: Schedule, key) -> quantizer.Targets:
    """Labels and next-scale inputs of a batch: latents from the frozen tokenizer (or the batch), then BSC."""
    latent, latent_schedule = encode(step_config, frozen, batch, schedule)
    return quantizer.bitwise_self_correction(
        latent,
        latent_schedule,
        key,
        strength=step_config.bsc_strength,
        num_flip_scales=step_config.bsc_num_flip_scales,
        requant=step_config.bsc_requant,
        patchify=step_config.patchify,
    )


def text_features(step_config: StepConfig, frozen: Frozen, batch: dict) -> jax.Array:
    """[B, T, Ct5] float32: precomputed features from the batch, or the frozen T5 encoder on its tokens."""
    if "text" in batch:
        return batch["text"].astype(jnp.float32)
    encoder = T5Encoder(step_config.text, jnp.dtype(step_config.text_dtype))
    with nn.logical_axis_rules(step_config.text_rules):
        features = encoder.apply({"params": frozen.text}, batch["tokens"], batch["text_mask"])
    return jax.lax.stop_gradient(features)


def conditioning(step_config: StepConfig, frozen: Frozen, batch: dict) -> dict:
    """The transformer's condition arguments: T5 features and their mask, or class labels."""
    if step_config.model.cond == "text":
        return {"text": text_features(step_config, frozen, batch), "text_mask": batch["text_mask"]}
    return {"labels": batch["label"]}


def micro_loss(params, *, step_config: StepConfig, frozen: Frozen, batch: dict, schedule: Schedule, key):
    """(loss, metrics) of one micro-batch."""
    c = step_config.model
    k_bsc, k_drop, k_path = jax.random.split(key, 3)
    targets = make_targets(step_config, frozen, batch, schedule, k_bsc)
    size = targets.labels.shape[0]
    drop = jax.random.bernoulli(k_drop, step_config.cond_drop_rate, (size,))
    cond = conditioning(step_config, frozen, batch)
    with nn.logical_axis_rules(step_config.rules):
        logits = Infinity(c).apply(
            {"params": params},
            targets.inputs,
            schedule,
            **cond,
            drop=drop,
            deterministic=c.drop_path == 0,
            rngs={"dropout": k_path},
        )
    return losses.next_scale_loss(
        logits,
        targets.labels,
        schedule,
        label_smoothing=step_config.label_smoothing,
        reweight_by_scale=step_config.reweight_by_scale,
    )


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] where micro-batch i takes rows i, i+n, …: every micro-batch is spread over all
    the devices the batch is sharded on (contiguous splits would each live on a few devices)."""

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    frozen: Frozen,
    batch: dict,
    *,
    step_config: StepConfig,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    schedule: Schedule,
):
    """One optimizer update over `grad_accum` micro-batches. Returns (new state, metrics)."""
    key = jax.random.fold_in(jax.random.key(step_config.seed), state.step)
    loss_of = functools.partial(micro_loss, step_config=step_config, frozen=frozen, schedule=schedule)
    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    n = step_config.grad_accum
    if n == 1:
        (loss, metrics), grads = grad_fn(state.params, batch=batch, key=key)
    else:
        micro = _micro_batches(batch, n)

        def accumulate(total, xs):
            micro_batch, index = xs
            (loss, metrics), grads = grad_fn(state.params, batch=micro_batch, key=jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (loss, metrics), grads = jax.eval_shape(functools.partial(grad_fn, batch=first, key=key), state.params)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, metrics, grads))
        (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n)))
        loss, metrics, grads = jax.tree.map(lambda x: x / n, (loss, metrics, grads))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Without the barrier XLA fuses the norm of the new parameters into the update's kernels, and a kernel with a
    # reduction does not write over its donated inputs: every parameter and both moments were written twice (a
    # temporary, then a copy), ~24 GiB per step for the 2B layout. The updates' norm is not reported for the same
    # reason (it would need the updates written out).
    params, opt_state = jax.lax.optimization_barrier((params, opt_state))
    metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": learning_rate(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
