"""One command for a scaling study: every size of a list trained on the same data with the same budget.

    python -m infinity_jax.scaling.sweep --config configs/scaling.py:cond=class,res=0.016M --workdir runs/scaling \\
        --config.data.path=data/metadata.jsonl [--only depth4] [--list]

Each size trains in WORKDIR/<size> with the ordinary trainer (so each is resumable on its own: rerun the same
command after a stop and it continues; finished sizes are skipped). The budget per size is a number of tokens
(`sweep.tokens`) or of training FLOPs (`sweep.flops`), turned into a step count; `sweep.evals` held-out
evaluations are spread over every run, so the fit sees each run's loss against compute. Before training, each
run writes WORKDIR/<size>/run.json: parameters N, non-embedding parameters (the blocks), bits d, tokens and
model FLOPs per step (counted from the traced forward and backward pass of the transformer alone), the step count.
`python -m infinity_jax.scaling.fit WORKDIR/*` fits the power laws. `--only NAME` trains one size (one job per
size on a cluster); `--list` prints those commands; `--max_minutes M` stops the whole sweep (checkpointed) after M
minutes, so a study can be done in several time slots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging

from infinity_jax import cli, flops, schedules
from infinity_jax import config as config_lib
from infinity_jax.models import sizes
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.scaling.fit import RUN_INFO
from infinity_jax.train import losses
from infinity_jax.train.trainer import train, transformer_config


def size_names(config: ml_collections.ConfigDict) -> list[str]:
    """The sweep's sizes, checked against the size table (names, aliases or depthN)."""
    names = [n.strip() for n in re.split(r"[,+]", str(config.sweep.sizes)) if n.strip()]
    if not names:
        raise ValueError("sweep.sizes is empty; give sizes such as depth2,depth4,depth8 or table names")
    for name in names:
        sizes.get_size(name)
    if len(set(names)) != len(names):
        raise ValueError(f"sweep.sizes repeats a size: {names}")
    return names


def config_for(base: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The base config with the model layout of size `name` (everything else unchanged)."""
    config = ml_collections.ConfigDict(base.to_dict())
    layout = config_lib.model_config(name)
    with config.unlocked():
        for field in ("size", *config_lib.LAYOUT_FIELDS):
            config.model[field] = layout[field]
    return config


def model_flops_per_step(model: TransformerConfig, schedule: schedules.Schedule, batch: int, text_length: int):
    """FLOPs of one training step of the transformer alone: forward and backward, no recomputation, dense
    block-causal attention, counted from the traced program (frozen tokenizer and T5 excluded)."""
    model = dataclasses.replace(model, remat="none", attention="xla")
    inputs = jax.ShapeDtypeStruct((batch, schedule.num_tokens - 1, model.bits), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, schedule.num_tokens, model.bits), jnp.int32)
    if model.cond == "text":
        cond = {
            "text": jax.ShapeDtypeStruct((batch, text_length, model.text_dim), jnp.float32),
            "text_mask": jax.ShapeDtypeStruct((batch, text_length), jnp.bool_),
        }
    else:
        cond = {"labels": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    params = parameter_shapes(model, schedule)

    def loss(p, inputs, labels, cond):
        logits = Infinity(model).apply({"params": p}, inputs, schedule, **cond)
        return losses.next_scale_loss(logits, labels, schedule)[0]

    return flops.count_flops(jax.value_and_grad(loss), params, inputs, labels, cond)


def parameter_shapes(model: TransformerConfig, schedule: schedules.Schedule):
    inputs = jnp.zeros((1, schedule.num_tokens - 1, model.bits))
    cond = (
        {"text": jnp.zeros((1, 1, model.text_dim)), "text_mask": jnp.ones((1, 1), bool)}
        if model.cond == "text"
        else {"labels": jnp.zeros((1,), jnp.int32)}
    )
    return jax.eval_shape(lambda: nn.unbox(Infinity(model).init(jax.random.key(0), inputs, schedule, **cond)["params"]))


def describe(config: ml_collections.ConfigDict, name: str) -> dict:
    """What run.json records about one size's run, and its step count under the sweep's budget."""
    model = transformer_config(config)
    schedule = schedules.infinity_schedule(config.data.default_template, config.schedule.resolution)
    batch = config.train.batch_size
    shapes = parameter_shapes(model, schedule)
    params = sum(x.size for x in jax.tree.leaves(shapes))
    blocks = sum(x.size for x in jax.tree.leaves(shapes["blocks"]))
    text_length = config.text.max_length if model.cond == "text" else 0
    step_flops = model_flops_per_step(model, schedule, batch, text_length)
    tokens_per_step = batch * schedule.num_tokens
    budget = config.sweep
    if budget.flops > 0:
        steps = math.ceil(budget.flops / step_flops)
    elif budget.tokens > 0:
        steps = math.ceil(budget.tokens / tokens_per_step)
    else:
        raise ValueError("give the sweep a budget: sweep.tokens > 0 (tokens per size) or sweep.flops > 0")
    return {
        "name": name,
        "layout": {f: config.model[f] for f in ("depth", "embed_dim", "num_heads", "ffn_dim")},
        "params": int(params),
        "non_embedding_params": int(blocks),
        "bits": int(model.bits),
        "cond": model.cond,
        "resolution": config.schedule.resolution,
        "batch_size": batch,
        "tokens_per_step": int(tokens_per_step),
        "flops_per_step": float(step_flops),
        "num_steps": int(steps),
        "budget": {"tokens": float(budget.tokens), "flops": float(budget.flops)},
        "done": False,
    }


def run_size(base: ml_collections.ConfigDict, name: str, root: str, max_minutes: float = 0.0) -> dict:
    """Trains one size to its budget in root/name (resuming it if it was stopped), for at most max_minutes when
    > 0; returns its run.json, whose `done` says whether the budget was reached."""
    config = config_for(base, name)
    info = describe(config, name)
    workdir = os.path.join(root, name)
    info_path = os.path.join(workdir, RUN_INFO)
    if os.path.exists(info_path):
        with open(info_path) as f:
            previous = json.load(f)
        if previous.get("done") and previous.get("num_steps") == info["num_steps"]:
            print(f"{name}: done ({info['num_steps']} steps), skipped", flush=True)
            return previous
    steps = info["num_steps"]
    every = max(1, steps // max(1, base.sweep.evals))
    with config.unlocked():
        config.train.num_steps = steps
        config.train.eval_every = every
        config.train.checkpoint_every = min(config.train.checkpoint_every, every)
        config.train.log_every = min(config.train.log_every, every)
        if max_minutes > 0:
            config.train.max_minutes = max_minutes
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    _write(info_path, info)
    print(f"{name}: N = {info['params']:,} ({info['non_embedding_params']:,} in the blocks), {steps} steps of "
          f"{info['tokens_per_step']} tokens, {info['flops_per_step']:.3g} FLOPs/step", flush=True)  # fmt: skip
    state, _ = train(config, workdir)
    if int(jax.device_get(state.step)) >= steps:
        info["done"] = True
        _write(info_path, info)
    return info


def _write(path: str, info: dict) -> None:
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(info, f, indent=1)
        os.replace(path + ".tmp", path)


def _commands(names: list[str]) -> list[str]:
    """This command once per size (`--only NAME`), for a launcher that runs each as its own job."""
    argv = [a for a in sys.argv[1:] if a != "--list" and not a.startswith("--only")]
    return [" ".join(["python -m infinity_jax.scaling.sweep", *argv, f"--only={name}"]) for name in names]


def main(config: ml_collections.ConfigDict) -> None:
    args = flags.FLAGS
    if not args.workdir:
        raise SystemExit("error: --workdir is required")
    if "sweep" not in config:
        raise SystemExit("error: the config has no `sweep` section (use configs/scaling.py)")
    logging.set_verbosity(logging.WARNING)
    try:
        names = size_names(config)
        if args.only and args.only not in names:
            raise ValueError(f"--only {args.only!r} is not in sweep.sizes ({', '.join(names)})")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.list:
        print("\n".join(_commands(names)))
        return
    deadline = time.monotonic() + 60 * args.max_minutes
    for name in [args.only] if args.only else names:
        left = (deadline - time.monotonic()) / 60 if args.max_minutes > 0 else 0.0
        if args.max_minutes > 0 and left <= 0:
            print(
                f"--max_minutes={args.max_minutes:g} spent before {name}; rerun the same command to go on", flush=True
            )
            return
        if not run_size(config, name, args.workdir, left)["done"]:
            # Stopped by SIGTERM or train.max_minutes: the next size must not start in the time that is left.
            print(f"{name}: stopped before its budget; rerun the same command to resume", flush=True)
            return


def console_main():
    # Flags are defined only when this runs as the program: importing the module must not claim --workdir.
    flags.DEFINE_string("workdir", None, "Root folder: one subfolder per size.")
    flags.DEFINE_string("only", None, "Train this size of the sweep only.")
    flags.DEFINE_bool("list", False, "Print one command per size and exit.")
    flags.DEFINE_float("max_minutes", 0.0, "Stop the whole sweep after this many minutes (0: no limit); resumable.")
    cli.run(main)


if __name__ == "__main__":
    console_main()
