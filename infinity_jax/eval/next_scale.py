"""Held-out evaluation of the transformer: its loss and bit accuracy per scale on records it never trains on.

Teacher-forced, as the official validation: targets from the frozen tokenizer and Bitwise Self-Correction at
`eval.bsc_strength` (0: the plain labels; the official validation option is 0.2) under a key fixed per batch, no
condition dropout, the training loss's per-scale weights. Optionally free-running (`eval.free_running`): the
model draws every scale itself (tau 1, no guidance, one fixed key) and is scored at each scale against the
labels of the latent's residual after its own earlier scales: the test-time situation that BSC trains for.

The held-out records (`data.holdout_every`) are read once, centre-cropped at the 1:1 template of the run's
resolution, with their short caption, and kept on the host. Every process holds all of them and feeds its rows of
each global evaluation batch; the last batch is padded and the padding weighs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infinity_jax import schedules
from infinity_jax.data import pipeline, sources
from infinity_jax.generate import generate
from infinity_jax.models.transformer import Infinity
from infinity_jax.text import load_text_tokenizer, tokenizer_path
from infinity_jax.train import losses
from infinity_jax.train import step as step_lib

_log = logging.getLogger("infinity_jax.eval")


def teacher_forced_sums(params, frozen, batch, valid, key, *, step_config, schedule):
    """Sums over the valid rows: {"loss": weighted training loss, "scale_loss" [K], "scale_acc" [K], "count"}."""
    targets = step_lib.make_targets(step_config, frozen, batch, schedule, key)
    cond = step_lib.conditioning(step_config, frozen, batch)
    with nn.logical_axis_rules(step_config.rules):
        logits = Infinity(step_config.model).apply({"params": params}, targets.inputs, schedule, **cond)
    return scale_sums(logits, targets.labels, schedule, valid)


def scale_sums(logits, labels, schedule, valid):
    """logits [B, L, d, 2], labels [B, L, d], valid [B] -> sums over the valid rows of the weighted loss, the
    per-scale loss and accuracy [K], and the number of rows."""
    per_token = losses.bit_cross_entropy(logits, labels)  # [B, L]
    accuracy = losses.bit_accuracy(logits, labels)
    weights = jnp.asarray(losses.token_weights(schedule))
    onehot = jax.nn.one_hot(jnp.asarray(schedule.scale_ids()), schedule.num_scales)
    counts = jnp.asarray(schedule.tokens_per_scale, jnp.float32)
    w = valid.astype(jnp.float32)
    return {
        "loss": jnp.sum(w * jnp.sum(per_token * weights, axis=-1)),
        "scale_loss": (w @ per_token) @ onehot / counts,
        "scale_acc": (w @ accuracy) @ onehot / counts,
        "count": jnp.sum(w),
    }


class NextScaleEval:
    """Callable (params, step) -> {"eval/loss": …, "eval/loss/s{k}": …, "eval/acc/s{k}": …}; `enabled` is False
    without held-out records or without `train.eval_every`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, step_config, frozen):
        ev = config.eval
        _, held = sources.split_holdout(sources.make_source(config.data), config.data.holdout_every)
        self.enabled = held is not None and config.train.eval_every > 0
        if not self.enabled:
            return
        self.mesh, self.frozen = mesh, frozen
        self.step_config = dataclasses.replace(step_config, bsc_strength=ev.bsc_strength, grad_accum=1)
        self.schedule = schedules.infinity_schedule(1.0, config.schedule.resolution)
        self.free_running = ev.free_running
        if self.free_running and jax.process_count() > 1:
            raise ValueError("eval.free_running runs on one process; set it False for multi-process runs")
        self.batch_size = ev.batch_size or config.train.batch_size
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.batch_size % ways or self.batch_size % jax.process_count():
            raise ValueError(
                f"eval.batch_size={self.batch_size} is not divisible by the mesh's {ways} batch shards "
                f"and {jax.process_count()} processes"
            )
        self.examples = self._read(config, held)
        self.batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._sums = jax.jit(  # sums replicated: every process reads the same totals
            functools.partial(teacher_forced_sums, step_config=self.step_config, schedule=self.schedule),
            out_shardings=replicated,
        )
        self._encode = jax.jit(
            lambda frozen, batch: (
                step_lib.encode(self.step_config, frozen, batch, self.schedule)[0],
                step_lib.conditioning(self.step_config, frozen, batch),
            )
        )

    def _read(self, config, held) -> dict[str, np.ndarray]:
        """Every usable held-out record preprocessed once: {name: [n, ...]} (images or latents, caption or label)."""
        cond = config.model.cond
        text_tokenizer = None
        if cond == "text" and not config.data.precomputed:
            text_tokenizer = load_text_tokenizer(tokenizer_path(config))
        pixel_size = self.schedule.pixel_size
        preprocess = pipeline.Preprocess(
            pixel_size,
            1.0,
            cond,
            text_tokenizer,
            config.text.max_length if cond == "text" else 0,
            1.0,  # always the short caption
            config.data.min_size,
            config.data.max_pixels,
            tuple(p // config.tokenizer.stride for p in pixel_size),
        )
        count = len(held) if config.eval.num_examples <= 0 else min(config.eval.num_examples, len(held))
        rng = np.random.default_rng(0)  # unused with short captions only; Preprocess asks for one
        examples, bad = [], 0
        for i in range(count):
            example = preprocess.random_map(held[i], rng)
            if "error" in example:
                bad += 1
                _log.warning("held-out record skipped: %s", example["error"])
                continue
            examples.append({k: v for k, v in example.items() if k not in ("id", "template")})
        if not examples:
            raise ValueError(f"none of the {count} held-out records could be used for the evaluation")
        self.skipped = bad
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _batches(self):
        """(this process's rows of each global batch, their validity), over all held-out examples."""
        n = len(next(iter(self.examples.values())))
        local = self.batch_size // jax.process_count()
        start = jax.process_index() * local
        for offset in range(0, n, self.batch_size):
            rows = np.arange(offset + start, offset + start + local)
            valid = rows < n
            rows = np.where(valid, rows, 0)  # padding repeats the first example and weighs nothing
            batch = {k: v[rows] for k, v in self.examples.items()}
            yield (
                {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()},
                jax.make_array_from_process_local_data(self.batch_sharding, valid),
            )

    def __call__(self, params, step: int) -> dict[str, float]:
        totals = None
        for index, (batch, valid) in enumerate(self._batches()):
            with jax.set_mesh(self.mesh):
                sums = self._sums(params, self.frozen, batch, valid, jax.random.key(index))
            sums = jax.device_get(sums)
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        results = _means(totals, "eval")
        if self.free_running:
            results.update(self._free_running(params))
        results["eval/examples"] = float(totals["count"])
        results["eval/skipped"] = float(self.skipped)
        return results

    def _free_running(self, params) -> dict[str, float]:
        totals = None
        config = dataclasses.replace(self.step_config.model, remat="none")
        for index, (batch, valid) in enumerate(self._batches()):
            with jax.set_mesh(self.mesh):
                latent, cond = self._encode(self.frozen, batch)
            out = generate(
                params, config, self.schedule, jax.random.key(index), **cond, tokenizer=None,
                patchify=self.step_config.patchify, return_logits=True, target_latent=latent,
            )  # fmt: skip
            logits = jnp.concatenate([x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in out.logits], axis=1)
            labels = jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in out.labels], axis=1)
            sums = jax.device_get(scale_sums(logits, labels, self.schedule, valid))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        return _means(totals, "eval/free")


def _means(totals: dict, prefix: str) -> dict[str, float]:
    count = max(float(totals["count"]), 1.0)
    out = {f"{prefix}/loss": float(totals["loss"]) / count}
    for k, (loss, acc) in enumerate(zip(totals["scale_loss"], totals["scale_acc"], strict=True)):
        out[f"{prefix}/loss/s{k}"] = float(loss) / count
        out[f"{prefix}/acc/s{k}"] = float(acc) / count
    last = len(totals["scale_loss"]) - 1
    out[f"{prefix}/last_scale_loss"] = out[f"{prefix}/loss/s{last}"]
    return out
