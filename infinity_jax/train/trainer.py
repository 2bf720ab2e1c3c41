"""The transformer as a task of the shared training loop (`loop.run`): its config, sharded state, frozen towers
and jitted step. `build` and `jit_step` are also what the ahead-of-time compiler (`infinity_jax.aot`) compiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from infinity_jax import config as config_lib
from infinity_jax import schedules, sharding
from infinity_jax.convert import converted
from infinity_jax.eval.next_scale import NextScaleEval
from infinity_jax.models.t5 import get_t5_layout
from infinity_jax.models.transformer import TransformerConfig
from infinity_jax.train import frozen as frozen_towers
from infinity_jax.train import loop, optim
from infinity_jax.train.step import Frozen, StepConfig, init_state, train_step


def _rules(pairs) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in pairs)


def transformer_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    m = config.model
    if m.family != "infinity":
        raise ValueError(f"training the {m.family} family is not supported yet (its VQ-VAE tokenizer is missing)")
    fields = ("depth", "embed_dim", "num_heads", "ffn_dim", "bits", "cond", "shared_aln", "drop_path", "text_dim",
              "text_maxlen", "num_classes", "dtype", "scan_blocks", "remat", "remat_free", "attention")  # fmt: skip
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


def make_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str) -> loop.Task:
    setup = build(config, mesh)
    # Precomputed records carry latents and T5 features: the frozen towers are then not needed on device.
    online = not config.data.precomputed
    frozen = frozen_towers.load(config, mesh, setup.step_config) if online else Frozen()
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

    def step(schedule, device_batch):
        if ("image" in device_batch or "tokens" in device_batch) and not online:
            raise ValueError(
                "data.precomputed=True but the records hold images/captions: write them with "
                "python -m infinity_jax.data.precompute, or set data.precomputed=False"
            )
        return jit_step(setup, schedule, frozen_shardings, device_batch)

    def init_from(state, path):
        params = converted.load_transformer(path, setup.step_config.model, setup.abstract_state.params)
        return state.replace(params=params)

    evaluator = NextScaleEval(config, mesh, setup.step_config, frozen)
    return loop.Task(
        abstract_state=setup.abstract_state,
        init=lambda key: nn.unbox(setup.init_fn(key)),
        frozen=frozen,
        jit_step=step,
        cond=config.model.cond,
        init_from=init_from,
        evaluate=(lambda state, step: evaluator(state.params, step)) if evaluator.enabled else None,
    )


def train(config: ml_collections.ConfigDict, workdir: str):
    """Trains the transformer to `train.num_steps` (or until SIGTERM). Returns (the final TrainState, the metrics
    logged)."""
    return loop.run(config, workdir, make_task)
