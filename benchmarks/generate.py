"""Generation latency of the infinity_2b layout on one GPU (random weights), against REFERENCE §8.2.

    python benchmarks/generate.py --results benchmarks/RESULTS.md
    python benchmarks/generate.py --resolutions 0.06M --attention cudnn --no-scan

Setting as the official measurement: batch 1 with CFG (2 rows), 32 text tokens, cfg 4, tau 0.5, top_p 0.97, bf16
blocks. Each cell: median of --repeats calls after --warmup calls (compilation excluded and reported apart), with
and without the tokenizer's decode. FLOPs are counted from the traced program.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from common import kernel_profile, median_seconds, peak_tflops, report

from infinity_jax import generate as gen
from infinity_jax import schedules
from infinity_jax.flops import count_flops
from infinity_jax.models.bsq_vae import TOKENIZERS
from infinity_jax.models.transformer import TransformerConfig, init_params
from infinity_jax.tokenizer import Tokenizer

OFFICIAL_SECONDS = {"0.06M": "0.44–0.47", "0.25M": "1.14–1.17", "1M": "1.04–1.43"}  # REFERENCE §8.2, H100


def bench_resolution(params, config, tok, text, mask, resolution, args):
    """(resolution, pixels, tokens, {decode: (median s, first-call s)}, transformer FLOPs, peak GiB)."""
    schedule = schedules.infinity_schedule(1.0, resolution)
    options = dict(text=text, text_mask=mask, cfg=4.0, tau=0.5, top_p=0.97)
    xla_options = {} if args.xla_options == "xla" else None
    key = jax.random.key(3)  # an input, as the text is: made once, not in every timed call
    cells = {}
    for decode in (True,) if args.decode_only else (False, True):

        def run(decode=decode):
            return gen.generate(
                params, config, schedule, key, tokenizer=tok if decode else None, **options,
                xla_options=xla_options,
            )  # fmt: skip

        start = time.perf_counter()
        jax.block_until_ready(run())
        first_call = time.perf_counter() - start
        cells[decode] = (median_seconds(run, args.warmup, args.repeats), first_call)
        # As it is measured, so that a run cut short by a time limit still reports the cells it finished.
        print(f"{resolution} {'with' if decode else 'without'} decode: {cells[decode][0]:.4f} s", flush=True)
    # FLOPs of the transformer part (generation without decode), counted from the traced program with XLA
    # attention: cuDNN's call is opaque to the counter, and at 1024² attention is about a third of the work.
    flop_config = dataclasses.replace(config, attention="xla")
    static = gen.Static(flop_config, schedule, args.batch, guided=True, known=False, return_logits=False)
    cfg, tau = jnp.full((schedule.num_scales,), 4.0), jnp.full((schedule.num_scales,), 0.5)

    def transformer(p):
        return gen._generate(
            p, jax.random.key(3), text, mask, None, None, None, cfg, tau, 0, 0.97, None, None, None, static
        )

    flops = float("nan") if args.decode_only else count_flops(transformer, params)  # (tracing takes ~20 s at 1024²)
    mem = jax.devices()[0].memory_stats()
    peak_gib = (mem or {}).get("peak_bytes_in_use", 0) / 2**30
    if args.profile:
        rows = kernel_profile(lambda: run(True), f"{args.profile}/{resolution}")
        print(
            f"\nWhere the time goes, {resolution} with decode (one call, GPU kernels):\n" + "\n".join(rows), flush=True
        )
    return resolution, schedule.pixel_size[0], schedule.num_tokens, cells, flops, peak_gib


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="infinity_2b")
    parser.add_argument("--resolutions", default="0.06M,0.25M,1M")
    parser.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    parser.add_argument("--no-scan", action="store_true", help="unroll the blocks instead of nn.scan")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--as-trained", action="store_true", help="float32 weights cast in each call, blocks as configured (--no-scan)"
    )
    parser.add_argument(
        "--layer-weights", choices=["slice", "in_place"], help="override generate.for_inference's choice"
    )
    parser.add_argument(
        "--generation-kernels",
        choices=["xla", "pallas"],
        help="override generate.for_inference's choice: the one-pass Pallas kernels around the self-attention "
        "(ops.qkv_cache, ops.residual_norm), or XLA's",
    )
    parser.add_argument(
        "--xla-options",
        choices=["platform", "xla"],
        default="platform",
        help="generate's compiler options for the platform (generate.compiler_options), or XLA's defaults",
    )
    parser.add_argument("--decode-only", action="store_true", help="only the cell with the decode (one compile)")
    parser.add_argument("--profile", help="folder for one profiled call per resolution; prints its top kernels")
    parser.add_argument("--results")
    args = parser.parse_args(argv)

    config = TransformerConfig.from_size(
        args.size, dtype="bfloat16", scan_blocks=not args.no_scan, attention=args.attention
    )
    text = jax.random.normal(jax.random.key(1), (args.batch, 32, config.text_dim))
    mask = jnp.ones((args.batch, 32), bool)
    # The key is an argument: drawn from a constant key, the 2B parameters would be constant-folded by XLA.
    init = jax.jit(
        lambda key: init_params(
            config,
            key,
            jnp.zeros((1, 0, config.bits)),
            schedules.Schedule(((1, 1),)),
            text=text[:1, :2],
            text_mask=mask[:1, :2],
        )
    )
    params = nn.unbox(init(jax.random.key(0)))
    if not args.as_trained:
        params, config = gen.for_inference(params, config)  # bf16 block weights
    if args.layer_weights:
        config = dataclasses.replace(config, layer_weights=args.layer_weights)
    if args.generation_kernels:
        config = dataclasses.replace(config, generation_kernels=args.generation_kernels)
    tok = Tokenizer.init(TOKENIZERS["d32reg"], jax.random.key(2), dtype=jnp.bfloat16)
    device = jax.devices()[0]
    peak = peak_tflops(device)
    rows = [bench_resolution(params, config, tok, text, mask, r, args) for r in args.resolutions.split(",")]
    lines = [
        "| res | tokens | transformer s | + decode s | images/s | compile s | TFLOP | TFLOP/s | MFU | peak GiB | "
        "official s (H100) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for resolution, pixels, tokens, cells, flops, mem in rows:
        seconds = cells[False][0] if False in cells else float("nan")
        tflops = flops / seconds / 1e12
        mfu = f"{tflops / peak:.0%}" if peak else "n/a"
        lines.append(
            f"| {pixels}² | {tokens} | {seconds:.3f} | {cells[True][0]:.3f} | {args.batch / cells[True][0]:.1f} | "
            f"{cells[True][1]:.0f} | {flops / 1e12:.1f} | "
            f"{tflops:.0f} | {mfu} | {mem:.1f} | {OFFICIAL_SECONDS.get(resolution, '–')} |"
        )
    description = (
        f"Device: {device.device_kind}; jax {jax.__version__}; bf16 blocks "
        f"({'float32 weights cast in each call' if args.as_trained else 'generate.for_inference: bf16 weights'}), attention {args.attention}, "
        f"{'scanned' if config.scan_blocks else 'unrolled'} blocks (layer weights: {config.layer_weights}, kernels: {config.generation_kernels}); XLA options: {args.xla_options}; 32 text tokens, cfg 4, tau 0.5, top_p 0.97; random weights; "
        f"median of {args.repeats} after {args.warmup} warm-up calls. Official: REFERENCE §8.2 (torch, same H100 kind)."
    )
    report(f"Generation latency, {args.size}, batch {args.batch} with CFG", description, lines, args.results)


if __name__ == "__main__":
    main()
