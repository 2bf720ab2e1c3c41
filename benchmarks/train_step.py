"""Training-step throughput of an Infinity layout on one GPU host (random weights and frozen towers), against
REFERENCE §8.2 (official, H100: 2B at 256² batch 16 11.7k tokens/s, at 512² batch 8 14.8k tokens/s).

    python benchmarks/train_step.py --results benchmarks/RESULTS.md
    python benchmarks/train_step.py --cells 0.06M:16 --attention xla,cudnn --remat nothing_saveable,dots_saveable
    python benchmarks/train_step.py --cells 0.25M:8 --blocks unrolled --remat dots_saveable+4  # last 4 blocks: none
    python benchmarks/train_step.py --cells 0.06M:16 --devices 1,2,4 --parallel fsdp   # scaling over GPUs

The step is the trainer's (`train.trainer.build` / `jit_step`): the frozen d32 tokenizer encodes uint8 images and
Bitwise Self-Correction makes the targets inside it, the frozen Flan-T5-XL-layout encoder runs on `--text_len`
tokens (32 real, padded), the transformer trains in bf16 with fp32 AdamW state. Input comes from device arrays
(the data pipeline is measured by the training runs). Each cell: median of --repeats steps after --warmup steps.
Model FLOPs are counted from the traced step with XLA attention (cuDNN's kernel is opaque to the counter, the work
is the same) and without rematerialisation (recomputation is not model work); MFU against the chip's dense bf16
peak. "targets %" is the share of the step spent in tokenizer encode +
BSC, timed as its own jitted function on the same batch. Every cell runs in its own process, so that its peak GPU
memory is its own.

Scaling over GPUs (`--devices 1,2,4`): each cell's batch is per device (weak scaling: n devices train n × batch
images per step) on a mesh of the first n devices along `--parallel` (data: replicated parameters; fsdp:
parameters and optimizer state sharded). "scaling" is tokens/s on n devices over n × tokens/s on one.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from common import kernel_profile, median_seconds, peak_tflops, report

from infinity_jax import schedules
from infinity_jax.cli import load_config_file
from infinity_jax.flops import count_flops
from infinity_jax.train import frozen as frozen_towers
from infinity_jax.train import step as step_lib
from infinity_jax.train import trainer

OFFICIAL_TOKENS_PER_S = {("0.06M", 16): "11.7k", ("0.25M", 8): "14.8k"}  # REFERENCE §8.2, H100


def make_config(size, resolution, batch, attention, remat, text_len, tokenizer_json, extra="", blocks="scanned"):
    config = load_config_file(f"configs/infinity.py:size={size},res={resolution},batch={batch}{extra}")
    config.model.scan_blocks = blocks == "scanned"
    config.tokenizer.checkpoint = config.text.checkpoint = "random"
    config.text.tokenizer = tokenizer_json
    config.text.max_length = text_len
    remat, _, free = remat.partition("+")  # "dots_saveable+4": the last 4 unrolled blocks are not rematerialised
    config.model.attention, config.model.remat, config.model.remat_free = attention, remat, int(free or 0)
    config.train.num_steps = 1000
    return config


def make_batch(config, schedule, text):
    """uint8 images and 32-token captions (as the official measurement): T5 token ids for the encoder inside the
    step, or T5 features [B, T, 2048], which is what the official train_step receives."""
    rng = np.random.default_rng(0)
    b, (h, w), t = config.train.batch_size, schedule.pixel_size, config.text.max_length
    batch = {"image": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)}
    batch["text_mask"] = np.broadcast_to(np.arange(t) < 32, (b, t))
    if text == "features":
        batch["text"] = rng.standard_normal((b, t, config.model.text_dim), dtype=np.float32)
    else:
        batch["tokens"] = rng.integers(1, 32000, (b, t)).astype(np.int32)
    return batch


def make_mesh(num_devices: int, parallel: str) -> jax.sharding.Mesh:
    """The first num_devices devices along the data or the fsdp axis."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"{num_devices} devices asked for, {len(devices)} present")
    shape = (num_devices, 1, 1) if parallel == "data" else (1, num_devices, 1)
    return jax.sharding.Mesh(np.asarray(devices[:num_devices]).reshape(shape), ("data", "fsdp", "tensor"))


def bench(config, args, text, mesh):
    setup = trainer.build(config, mesh)
    frozen = frozen_towers.load(config, mesh, setup.step_config)
    schedule = schedules.infinity_schedule(1.0, config.schedule.resolution)
    host = make_batch(config, schedule, text)
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in host.items()}
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    step, fn = trainer.jit_step(setup, schedule, frozen_shardings, batch)
    abstract = setup.abstract_state
    state = jax.jit(lambda key: nn.unbox(setup.init_fn(key)), out_shardings=setup.state_shardings)(jax.random.key(0))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, batch)
        return metrics["loss"]

    with jax.set_mesh(mesh):
        seconds = median_seconds(run, args.warmup, args.repeats)
        if args.profile:
            print("PROFILE " + json.dumps(kernel_profile(run, args.profile)), flush=True)
        targets = jax.jit(functools.partial(step_lib.make_targets, setup.step_config, schedule=schedule))
        target_seconds = median_seconds(lambda: targets(frozen, batch, key=jax.random.key(1)).labels, 2, args.repeats)
        # Model FLOPs: the same step with XLA attention (cuDNN's call is opaque to the counter) and without
        # rematerialisation (recomputed forwards are not model FLOPs: MFU, not hardware FLOPs utilisation).
        if (config.model.attention, config.model.remat) != ("xla", "none"):
            xla = make_config(args.size, config.schedule.resolution, config.train.batch_size, "xla",
                              "none", config.text.max_length, args.text_tokenizer, args.config_args)  # fmt: skip
            xla_setup = trainer.build(xla, mesh)
            _, fn = trainer.jit_step(xla_setup, schedule, frozen_shardings, batch)
            abstract = xla_setup.abstract_state
        flops = count_flops(fn, abstract, frozen, batch)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    return seconds, target_seconds, flops, peak, schedule.num_tokens


def one_cell(args) -> None:
    """--single RES:BATCH:ATTENTION:REMAT:TEXT:BLOCKS:DEVICES: measures one cell (batch per device), prints one JSON
    line."""
    res, batch, attention, remat, text, blocks, devices = args.single.split(":")
    devices = int(devices)
    config = make_config(args.size, res, int(batch) * devices, attention, remat, args.text_len, args.text_tokenizer,
                         args.config_args, blocks)  # fmt: skip
    seconds, target_s, flops, peak, tokens = bench(config, args, text, make_mesh(devices, args.parallel))
    print(
        "CELL " + json.dumps({"seconds": seconds, "targets": target_s, "flops": flops, "peak": peak, "tokens": tokens})
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="infinity_2b")
    parser.add_argument("--cells", default="0.06M:16,0.25M:8", help="resolution:batch pairs")
    parser.add_argument("--attention", default="xla,cudnn")
    parser.add_argument("--remat", default="nothing_saveable")
    parser.add_argument("--text_len", type=int, default=512, help="T5 input length (512: as the official code)")
    parser.add_argument(
        "--text",
        default="t5",
        help="t5: the frozen T5 encoder runs inside the step; features: the step gets T5 features (as the official "
        "train_step, whose T5 runs outside it); or both, comma-separated",
    )
    parser.add_argument(
        "--blocks",
        default="scanned",
        help="scanned (nn.scan over the stacked layers: one block compiled) or unrolled (one per layer: slower to "
        "compile, no scan stacks to fill), or both",
    )
    parser.add_argument("--devices", default="", help="device counts, e.g. 1,2,4 (default: one device)")
    parser.add_argument("--parallel", default="data", choices=["data", "fsdp"], help="the mesh axis the devices form")
    parser.add_argument("--text_tokenizer", default="tests/assets/t5_tokenizer/tokenizer.json")
    parser.add_argument("--config_args", default="", help="more config arguments, e.g. ,tokenizer=tiny,t5=tiny")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", help="folder for one profiled step per cell; prints its top kernels")
    parser.add_argument("--results")
    args = parser.parse_args(argv)
    if args.single:
        return one_cell(args)

    device = jax.devices()[0]
    peak_tf = peak_tflops(device)
    rows = [
        "| res | batch/device | devices | attention | remat | text (len) | blocks | s/step | tokens/s | images/s | TFLOP/step | "
        "TFLOP/s | MFU | scaling | targets % | peak GiB/device | official tokens/s (H100) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = [c.split(":") for c in args.cells.split(",")]
    device_counts = [int(n) for n in args.devices.split(",")] if args.devices else [1]
    grid = itertools.product(
        cells,
        args.attention.split(","),
        args.remat.split(","),
        args.text.split(","),
        args.blocks.split(","),
        device_counts,
    )
    single_device = {}  # tokens/s on one device, per cell, for the scaling column
    for (res, batch), attention, remat, text, blocks, n in grid:
        name = f"{res}:{batch}:{attention}:{remat}:{text}:{blocks}"
        where = f"{n} {args.parallel if n > 1 else ''}".strip()
        command = [sys.executable, __file__, "--single", f"{name}:{n}", "--size", args.size, "--parallel", args.parallel,
                   "--text_len", str(args.text_len), "--text_tokenizer", args.text_tokenizer, "--warmup",
                   str(args.warmup), "--repeats", str(args.repeats), "--config_args", args.config_args]  # fmt: skip
        if args.profile:
            command += ["--profile", f"{args.profile}/{name.replace(':', '-')}-{n}"]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("CELL ")]
        if done.returncode or not found:  # one failing cell (e.g. out of memory) should not lose the others
            errors = [line for line in done.stderr.splitlines() if "Error" in line] or ["?"]
            rows.append(f"| {res} | {batch} | {where} | {attention} | {remat} | {text} {args.text_len} | {blocks} | "
                        f"failed: {errors[-1][:100]} |||||||||")  # fmt: skip
            print(rows[-1], flush=True)
            continue
        for line in done.stdout.splitlines():
            if line.startswith("PROFILE "):
                print(f"\nWhere the step's time goes ({name}, {where} devices):", flush=True)
                print("\n".join(json.loads(line[8:])) + "\n", flush=True)
        cell = json.loads(found[-1][5:])
        seconds, target_s, flops, peak, tokens = (cell[k] for k in ("seconds", "targets", "flops", "peak", "tokens"))
        images = int(batch) * n
        tokens_per_s = images * tokens / seconds
        if n == 1:
            single_device[name] = tokens_per_s
        scaling = f"{tokens_per_s / (n * single_device[name]):.0%}" if name in single_device else "–"
        tflops = flops / seconds / 1e12
        mfu = f"{tflops / (n * peak_tf):.0%}" if peak_tf else "–"
        rows.append(
            f"| {res} | {batch} | {where} | {attention} | {remat} | {text} {args.text_len} | {blocks} | {seconds:.3f} | "
            f"{tokens_per_s / 1e3:.1f}k | {images / seconds:.1f} | {flops / 1e12:.1f} | {tflops:.0f} | {mfu} | "
            f"{scaling} | {target_s / seconds:.0%} | {peak:.1f} | {OFFICIAL_TOKENS_PER_S.get((res, images), '–')} |"
        )
        print(rows[-1], flush=True)
    versions = f"jax {jax.__version__}"
    text_where = {"t5": "Flan-T5-XL layout inside the step", "features": "T5 features given (as the official step)"}
    text_source = " / ".join(text_where[t] for t in args.text.split(","))
    description = (
        f"Device: {device.device_kind}; {versions}. {args.size}, random weights, bf16 compute, fp32 params/AdamW, "
        f"frozen tokenizer + BSC inside the step; {text_source}; median of {args.repeats} steps; "
        f"devices {args.devices or 1} ({args.parallel} parallel beyond one), batch per device."
    )
    report(f"Training step, {args.size}", description, rows, args.results)


if __name__ == "__main__":
    main()
