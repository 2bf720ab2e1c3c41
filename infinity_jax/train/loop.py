"""The training loop shared by every model we train (the transformer, the tokenizer): mesh, sharded init or
resume, input, the jitted step, metrics, periodic evaluation, checkpoints and preemption.

What is trained is a `Task`: its state's shapes and shardings, how to initialise it, the frozen parameters every step
reads, the jitted step of a schedule, and optionally an evaluation. Everything else lives here once.

Resume order (big_vision's): a checkpoint in the workdir, else `train.init_from` (a params-only checkpoint, e.g.
converted official weights), else a fresh sharded init. SIGTERM (or a pod's preemption notice) saves the state and
the data position, waits for the save, and returns; the same command then resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from infinity_jax import config as config_lib
from infinity_jax import flops, schedules, sharding
from infinity_jax.data import pipeline, sources
from infinity_jax.schedules import Schedule
from infinity_jax.text import load_text_tokenizer, tokenizer_path
from infinity_jax.train import checkpoint, metrics

HOST_FIELDS = ("id", "skipped", "template")
_log = logging.getLogger("infinity_jax.train")


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Task:
    """What one run trains.

    abstract_state: the train state as ShapeDtypeStructs carrying the mesh's shardings (restore target).
    init: key -> a fresh state (plain arrays); jitted here into `abstract_state`'s shardings.
    frozen: parameters every step reads but does not train (a pytree of placed arrays).
    jit_step: (schedule, a device batch) -> (the jitted step (state, frozen, batch) -> (state, metrics), the same
      step unjitted, for FLOP counting).
    cond: what the input pipeline loads besides images: "text", "class" or "none".
    init_from: (state, path) -> state whose trained parameters come from a params-only checkpoint at `path`.
    evaluate: (state, step) -> metrics of a held-out evaluation (it may also write files), or None.
    tokens: tokens per example of a schedule (for tok/s).
    """

    abstract_state: Any
    init: Callable[[jax.Array], Any]
    frozen: Any
    jit_step: Callable[[Schedule, dict], tuple[Callable, Callable]]
    cond: str
    init_from: Callable[[Any, str], Any]
    evaluate: Callable[[Any, int], dict] | None = None
    tokens: Callable[[Schedule], int] = lambda schedule: schedule.num_tokens


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` on multi-process launches only (it fails on a plain single-host run).

    INFINITY_JAX_DISTRIBUTED=1 lets JAX find the cluster itself (TPU pod slices, SLURM, GKE/XPK); an explicit
    JAX_COORDINATOR_ADDRESS (host:port) with JAX_NUM_PROCESSES and JAX_PROCESS_ID starts any other group, e.g.
    several processes of one GPU host or of a CPU machine (whose cross-process collectives are gloo's).
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if os.environ.get("INFINITY_JAX_DISTRIBUTED") != "1" and not explicit:
        return
    if jax.distributed.is_initialized():
        return
    if "cpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not explicit:
        jax.distributed.initialize()
        return
    missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in os.environ]
    if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} are not")
    jax.distributed.initialize(
        coordinator_address=explicit,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )


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


def _out_of_time(deadline: float | None, step: int, log_every: int) -> bool:
    """Whether `train.max_minutes` is spent: after every step in one process; with several, at logging steps only,
    where process 0 decides (clocks differ, and the processes must stop at the same step)."""
    if deadline is None:
        return False
    if jax.process_count() == 1:
        return time.monotonic() > deadline
    if step % log_every:
        return False
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(time.monotonic() > deadline)))


def training_source(config: ml_collections.ConfigDict):
    """The configured source without its held-out records (`data.holdout_every`)."""
    train, _ = sources.split_holdout(sources.make_source(config.data), config.data.holdout_every)
    return train


def make_input(config: ml_collections.ConfigDict, cond: str, process_index: int, process_count: int):
    online_text = cond == "text" and not config.data.precomputed
    tokenizer = load_text_tokenizer(tokenizer_path(config)) if online_text else None
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
        read_threads=config.data.read_threads,
        read_ahead=config.data.read_ahead,
        latent_stride=config.tokenizer.stride,
    )
    return pipeline.make_dataset(training_source(config), spec, process_index, process_count)


def _check_finite(step: int, values: dict, last_saved: int | None) -> None:
    bad = [k for k in ("loss", "grad_norm", "param_norm") if k in values and not np.isfinite(values[k])]
    if bad:
        kept = f"the last good checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(f"non-finite {' and '.join(bad)} at step {step}; stopping ({kept})")


def run(config: ml_collections.ConfigDict, workdir: str, make_task: Callable[..., Task]):
    """Trains `make_task(config, mesh, workdir)` to `train.num_steps`, until `train.max_minutes` of this call are
    spent, or until SIGTERM.

    Returns (the final state, the metrics logged: one dict per logged step, evaluations included).
    """
    config_lib.validate(config)
    max_seconds = 60.0 * config.train.max_minutes
    deadline = time.monotonic() + max_seconds if max_seconds > 0 else None
    maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(**config.mesh)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % batch_ways:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not divisible by the {batch_ways} batch shards of the "
            f"mesh {dict(mesh.shape)} (data × fsdp); change the batch or the mesh"
        )
    task = make_task(config, mesh, workdir)
    total = config.train.num_steps
    state_shardings = jax.tree.map(lambda x: x.sharding, task.abstract_state)

    iterator = iter(make_input(config, task.cond, jax.process_index(), jax.process_count()))
    manager = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints, config.train.async_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        state = manager.restore(latest, task.abstract_state, iterator)
        _log.info("resumed from %s at step %d", workdir, latest)
    else:
        state = jax.jit(task.init, out_shardings=state_shardings)(jax.random.key(config.seed))
        if config.train.init_from:
            state = task.init_from(state, config.train.init_from)
    last_saved = latest

    peak = flops.peak_flops(jax.devices()[0])
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    compiled, step_flops = {}, {}

    def step_fn(schedule, device_batch):
        if schedule not in compiled:
            compiled[schedule], fn = task.jit_step(schedule, device_batch)
            if config.train.count_flops and peak:  # MFU needs the chip's peak; CPUs have none
                step_flops[schedule] = flops.count_flops(fn, task.abstract_state, task.frozen, device_batch)
        return compiled[schedule]

    writer = metrics.MetricWriter(workdir, total, enabled=jax.process_index() == 0)
    stop = _StopSignal()
    history, skipped, interval_start, interval_steps = [], 0, None, 0
    step = int(jax.device_get(state.step))
    eval_every = config.train.get("eval_every", 0)
    try:
        while step < total:
            batch = next(iterator)
            host = {k: batch.pop(k) for k in HOST_FIELDS}
            skipped += int(host["skipped"].sum())
            schedule = schedules.infinity_schedule(float(host["template"][0]), config.schedule.resolution)
            device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
            with jax.set_mesh(mesh):
                state, step_metrics = step_fn(schedule, device_batch)(state, task.frozen, device_batch)
            step += 1
            if interval_start is None:  # the first step compiles: time from its end
                jax.block_until_ready(step_metrics)
                interval_start, interval_steps = time.perf_counter(), 0
            else:
                interval_steps += 1
            stopping = _preempted(stop, manager, step)
            final = step == total or _out_of_time(deadline, step, config.train.log_every)
            log_now = step % config.train.log_every == 0 or final or stopping
            save_now = step % config.train.checkpoint_every == 0 or final or stopping
            eval_now = task.evaluate is not None and eval_every > 0 and (step % eval_every == 0 or final)
            if log_now or save_now:
                values = metrics.flatten(jax.device_get(step_metrics))
                _check_finite(step, values, last_saved)
            if log_now:
                elapsed = time.perf_counter() - interval_start
                if interval_steps:
                    step_time = elapsed / interval_steps
                    values["step_time"] = step_time
                    values["images_per_s"] = config.train.batch_size / step_time
                    values["tokens_per_s"] = config.train.batch_size * task.tokens(schedule) / step_time
                    if schedule in step_flops and peak:
                        values["mfu"] = step_flops[schedule] / step_time / (peak * jax.device_count())
                values["data/skipped"] = skipped
                stats = jax.local_devices()[0].memory_stats()  # None on CPU
                if stats and "peak_bytes_in_use" in stats:
                    values["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
                extra = {"example_ids": host["id"].tolist()} if config.train.record_example_ids else None
                writer.write(step, values, extra)
                history.append({"step": step, **values, **(extra or {})})
            if save_now:
                manager.save(step, state, iterator, config, force=True)
                last_saved = step
            if eval_now and not stopping:
                with jax.set_mesh(mesh):
                    evaluated = task.evaluate(state, step)
                writer.write(step, evaluated)
                history.append({"step": step, **evaluated})
            if log_now or eval_now:  # neither logging nor evaluation counts towards the step time
                interval_start, interval_steps = time.perf_counter(), 0
            if stopping:
                _log.warning("stop requested (SIGTERM/preemption): saved step %d, exiting", step)
                break
            if final and step < total:
                _log.warning("train.max_minutes=%g spent: stopped at step %d", config.train.max_minutes, step)
                break
    finally:
        manager.wait()
        manager.close()
        writer.close()
        stop.restore()
    return state, history
