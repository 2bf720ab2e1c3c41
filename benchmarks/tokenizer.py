"""Tokenizer encode/decode throughput on one GPU: ours (JAX) and, optionally, the official PyTorch tokenizer.

    python benchmarks/tokenizer.py                        # ours, bf16, d32 at 256², 512², 1024²
    python benchmarks/tokenizer.py --official /path/to/Infinity --results benchmarks/RESULTS.md

Random weights (the architecture decides the speed). Each cell: median of --repeats timed calls after --warmup
calls, device-synchronised. FLOPs are counted from our traced program (`infinity_jax.flops`; the official model
does the same convolutions). Prints a table last and, with --results, appends it to that file with date, device,
versions and command.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
from common import median_seconds, peak_tflops, report

from infinity_jax.flops import count_flops
from infinity_jax.models.bsq_vae import TOKENIZERS
from infinity_jax.tokenizer import Tokenizer

CASES = ((256, 32), (512, 8), (1024, 2))  # (resolution, batch)


def time_torch(fn, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def bench_ours(name: str, dtype, warmup: int, repeats: int):
    config = TOKENIZERS[name]
    tok = Tokenizer.init(config, jax.random.key(0), dtype=dtype)
    encode, decode = jax.jit(Tokenizer.encode), jax.jit(Tokenizer.decode_latent)
    rows = []
    for resolution, batch in CASES:
        images = jax.random.uniform(jax.random.key(1), (batch, resolution, resolution, 3), minval=-1, maxval=1)
        latent = encode(tok, images)
        for stage, fn, arg in (("encode", encode, images), ("decode", decode, latent)):
            flops = count_flops(fn, tok, arg)
            seconds = median_seconds(lambda fn=fn, arg=arg: fn(tok, arg), warmup, repeats)
            rows.append((resolution, batch, stage, seconds, flops))
    peak_gb = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30  # None on CPU
    return rows, peak_gb


def bench_official(checkout: str, name: str, warmup: int, repeats: int):
    import torch

    from infinity_jax.parity import official_tokenizer

    vae = official_tokenizer(checkout, TOKENIZERS[name]).cuda().eval()
    rows = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for resolution, batch in CASES:
            images = torch.rand(batch, 3, resolution, resolution, device="cuda") * 2 - 1
            latent = vae.encoder(images).float()
            rows[(resolution, "encode")] = time_torch(lambda images=images: vae.encoder(images), warmup, repeats)
            rows[(resolution, "decode")] = time_torch(lambda latent=latent: vae.decode(latent), warmup, repeats)
    return rows, torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="d32", choices=sorted(TOKENIZERS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--official", help="checkout of FoundationVision/Infinity to time beside ours")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", help="append the table to this markdown file")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    ours, ours_mem = bench_ours(args.tokenizer, jnp.dtype(args.dtype), args.warmup, args.repeats)
    official, official_mem = (
        bench_official(args.official, args.tokenizer, args.warmup, args.repeats) if args.official else ({}, None)
    )
    peak = peak_tflops(device)
    lines = [
        "| res | batch | stage | ours ms | ours img/s | TFLOP/s | MFU | official ms | official img/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for resolution, batch, stage, seconds, flops in ours:
        tflops = flops / seconds / 1e12
        mfu = f"{tflops / peak:.0%}" if peak else "n/a"
        ref = official.get((resolution, stage))
        ref_cols = f"{ref * 1e3:.1f} | {batch / ref:.1f} | {ref / seconds:.2f}x" if ref else "– | – | –"
        lines.append(
            f"| {resolution}² | {batch} | {stage} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {tflops:.0f} | "
            f"{mfu} | {ref_cols} |"
        )
    versions = f"jax {jax.__version__}"
    if args.official:
        import torch

        versions += f", torch {torch.__version__} (official, bf16 autocast)"
    memory = f"ours {ours_mem:.1f} GiB" + (f", official {official_mem:.1f} GiB" if official_mem is not None else "")
    mfu_note = f" MFU against {peak:.0f} TFLOP/s dense bf16." if peak else ""
    description = (
        f"Device: {device.device_kind}; {versions}. Random weights; median of {args.repeats} calls after "
        f"{args.warmup} warm-up calls. Peak GPU memory: {memory}.{mfu_note}"
    )
    report(f"Tokenizer {args.tokenizer} throughput, {args.dtype}", description, lines, args.results)


if __name__ == "__main__":
    main()
