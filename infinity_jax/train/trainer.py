"""The training loop of the transformer: mesh, sharded init or resume, input, the jitted step, metrics, checkpoints.

Resume order (big_vision's): a checkpoint in the workdir, else `train.init_from` (a params-only checkpoint, e.g.
converted official weights), else a fresh sharded init. SIGTERM (or a pod's preemption notice) saves the state and
the data position, waits for the save, and returns; the same command then resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from infinity_jax import config as config_lib
from infinity_jax import flops, schedules, sharding
from infinity_jax.data import pipeline, sources
from infinity_jax.models.t5 import get_t5_layout
from infinity_jax.models.transformer import TransformerConfig
from infinity_jax.text import load_text_tokenizer
from infinity_jax.train import checkpoint, metrics, optim
from infinity_jax.train import frozen as frozen_towers
from infinity_jax.train.step import Frozen, StepConfig, init_state, train_step

HOST_FIELDS = ("id", "skipped", "template")
_log = logging.getLogger("infinity_jax.train")


class NonFiniteLossError(FloatingPointError):
    pass


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-process launches only (it fails on a plain single-host run)."""
    if os.environ.get("INFINITY_JAX_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def _rules(pairs) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in pairs)


def transformer_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    m = config.model
    if m.family != "infinity":
        raise ValueError(f"training the {m.family} family is not supported yet (its VQ-VAE tokenizer is missing)")
    fields = ("depth", "embed_dim", "num_heads", "ffn_dim", "bits", "cond", "shared_aln", "drop_path", "text_dim",
              "text_maxlen", "num_classes", "dtype", "scan_blocks", "remat", "attention")  # fmt: skip
    return TransformerConfig(**{f: m[f] for f in fields if f in m})


def step_config(config: ml_collections.ConfigDict) -> StepConfig:
    model = transformer_config(config)
    text = get_t5_layout(config.text.layout) if model.cond == "text" else None
    return StepConfig(
        model=model,
        text=text,
        text_dtype=config.text.dtype if text else "float32",
        patchify=config.tokenizer.patchify,
        bsc_strength=config.bsc.strength,
        bsc_num_flip_scales=config.bsc.num_flip_scales,
        bsc_requant=config.bsc.requant,
        cond_drop_rate=config.model.cond_drop_rate,
        label_smoothing=config.train.label_smoothing,
        reweight_by_scale=config.train.reweight_by_scale,
        grad_accum=config.train.grad_accum,
        seed=config.seed,
        rules=_rules(config.sharding.rules),
        tokenizer_rules=_rules(config.sharding.tokenizer_rules),
        text_rules=_rules(config.sharding.text_rules),
    )


# -- the loop --------------------------------------------------------------------------------------------------


class _StopSignal:
    """Turns SIGTERM into a flag checked between steps (installed from the main thread only)."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _preempted(stop: _StopSignal, manager: checkpoint.Checkpointer, step: int) -> bool:
    # Multi-process: every process must stop at the same step; jax's preemption sync point agrees on one.
    if jax.process_count() > 1:
        return manager.manager.reached_preemption(step)
    return stop.requested


def _input(config, process_index: int, process_count: int):
    cond = config.model.cond
    online_text = cond == "text" and not config.data.precomputed
    tokenizer = load_text_tokenizer(frozen_towers.text_tokenizer_path(config)) if online_text else None
    spec = pipeline.InputSpec(
        resolution=config.schedule.resolution,
        cond=cond,
        global_batch=config.train.batch_size,
        templates=config_lib.templates(config),
        default_template=config.data.default_template,
        seed=config.seed,
        text_tokenizer=tokenizer,
        max_length=config.text.max_length if cond == "text" else 0,
        short_caption_prob=config.data.short_caption_prob,
        min_size=config.data.min_size,
        max_pixels=config.data.max_pixels,
        workers=config.data.workers,
        latent_stride=config.tokenizer.stride,
    )
    return pipeline.make_dataset(sources.make_source(config.data), spec, process_index, process_count)


def _check_finite(step: int, values: dict, last_saved: int | None) -> None:
    bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(values[k])]
    if bad:
        kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(f"non-finite {' and '.join(bad)} at step {step}; stopping ({kept})")


@dataclasses.dataclass(frozen=True)
class Setup:
    """The pieces of a run that depend only on the config and the mesh (shared with the AOT compiler)."""

    step_config: StepConfig
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule
    init_fn: Callable  # key -> TrainState with logically partitioned (boxed) parameters
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying the shardings
    batch_sharding: jax.sharding.NamedSharding


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    sc = step_config(config)
    optimizer, learning_rate = optim.make_optimizer(config.optim, config.train.batch_size, config.train.num_steps)
    # Parameters do not depend on the schedule: any template gives the same shapes.
    init_schedule = schedules.infinity_schedule(config_lib.templates(config)[0], config.schedule.resolution)
    init_fn = functools.partial(init_state, sc, optimizer, init_schedule)
    abstract = sharding.abstract_arrays(jax.eval_shape(init_fn, jax.random.key(0)), mesh, sc.rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    return Setup(sc, optimizer, learning_rate, init_fn, state_shardings, abstract, batch_sharding)


def jit_step(setup: Setup, schedule: schedules.Schedule, frozen_shardings, batch: dict):
    """(the jitted step for one schedule, the plain step function) with state donated and every sharding given."""
    fn = functools.partial(
        train_step,
        step_config=setup.step_config,
        optimizer=setup.optimizer,
        learning_rate=setup.learning_rate,
        schedule=schedule,
    )
    batch_shardings = jax.tree.map(lambda _: setup.batch_sharding, batch)
    jitted = jax.jit(
        fn,
        in_shardings=(setup.state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )
    return jitted, fn


def train(config: ml_collections.ConfigDict, workdir: str):
    """Trains to `train.num_steps` (or until SIGTERM). Returns (the final TrainState, the metrics logged)."""
    config_lib.validate(config)
    maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(**config.mesh)
    setup = build(config, mesh)
    total = config.train.num_steps

    # Precomputed records carry latents and T5 features: the frozen towers are then not needed on device.
    online = not config.data.precomputed
    frozen = frozen_towers.load(config, mesh, setup.step_config) if online else Frozen()
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    dataset = _input(config, jax.process_index(), jax.process_count())
    iterator = iter(dataset)
    manager = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints, config.train.async_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, setup.abstract_state, iterator)
        _log.info("resumed from %s at step %d", workdir, latest)
    else:
        init_key = jax.random.key(config.seed)
        state = jax.jit(lambda k: nn.unbox(setup.init_fn(k)), out_shardings=setup.state_shardings)(init_key)
        if config.train.init_from:
            state = state.replace(params=checkpoint.load_params(config.train.init_from, setup.abstract_state.params))
    last_saved = latest

    peak = flops.peak_flops(jax.devices()[0])
    batch_sharding = setup.batch_sharding
    compiled, step_flops = {}, {}

    def step_fn(schedule, device_batch):
        if schedule not in compiled:
            if ("image" in device_batch or "tokens" in device_batch) and not online:
                raise ValueError(
                    "data.precomputed=True but the records hold images/captions: write them with "
                    "python -m infinity_jax.data.precompute, or set data.precomputed=False"
                )
            compiled[schedule], fn = jit_step(setup, schedule, frozen_shardings, device_batch)
            if config.train.count_flops and peak:  # MFU needs the chip's peak; CPUs have none
                step_flops[schedule] = flops.count_flops(fn, setup.abstract_state, frozen, device_batch)
        return compiled[schedule]

    writer = metrics.MetricWriter(workdir, total, enabled=jax.process_index() == 0)
    stop = _StopSignal()
    history, skipped, interval_start, interval_steps = [], 0, None, 0
    step = int(jax.device_get(state.step))
    try:
        while step < total:
            batch = next(iterator)
            host = {k: batch.pop(k) for k in HOST_FIELDS}
            skipped += int(host["skipped"].sum())
            schedule = schedules.infinity_schedule(float(host["template"][0]), config.schedule.resolution)
            device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
            with jax.set_mesh(mesh):
                state, step_metrics = step_fn(schedule, device_batch)(state, frozen, device_batch)
            step += 1
            if interval_start is None:  # the first step compiles: time from its end
                jax.block_until_ready(step_metrics)
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += 1
            stopping = _preempted(stop, manager, step)
            log_now = step % config.train.log_every == 0 or step == total or stopping
            save_now = step % config.train.checkpoint_every == 0 or step == total or stopping
            if log_now or save_now:
                values = metrics.flatten(jax.device_get(step_metrics))
                _check_finite(step, values, last_saved)
            if log_now:
                elapsed = time.perf_counter() - interval_start
                if interval_steps:
                    step_time = elapsed / interval_steps
                    values["step_time"] = step_time
                    values["images_per_s"] = config.train.batch_size / step_time
                    values["tokens_per_s"] = config.train.batch_size * schedule.num_tokens / step_time
                    if schedule in step_flops and peak:
                        values["mfu"] = step_flops[schedule] / step_time / (peak * jax.device_count())
                values["data/skipped"] = skipped
                extra = {"example_ids": host["id"].tolist()} if config.train.record_example_ids else None
                writer.write(step, values, extra)
                history.append({"step": step, **values, **(extra or {})})
                interval_start, interval_steps = time.perf_counter(), 0
            if save_now:
                manager.save(step, state, iterator, config, force=True)
                last_saved = step
            if stopping:
                _log.warning("stop requested (SIGTERM/preemption): saved step %d, exiting", step)
                break
    finally:
        manager.wait()
        manager.close()
        writer.close()
        stop.restore()
    return state, history
