"""One generation scale's gemms over a stack of layers: XLA's sliced weights against `ops.layer_matmul` in place.

    python benchmarks/layer_matmul.py                       # 2B block shapes, the 256² schedule's row counts
    python benchmarks/layer_matmul.py --sweep               # also try other tiles, print the best per row count
    python benchmarks/layer_matmul.py --rows 800,2048,8192 --sweep   # the compute-bound scales of 1024²

For each M (rows: 2 × the tokens of a scale, with guidance) a jitted scan over the depth runs a block's six
weight gemms (qkv, self-attention output, cross-attention query and output, fc1, fc2) on inputs of M rows, once
with the layer's kernels sliced out of the stacks by the scan (what `nn.scan` does) and once with
`layer_matmul` reading them in place. Prints ms per scale, the weights' bandwidth (GB/s) and the largest difference.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from common import median_seconds

from infinity_jax.ops.layer_matmul import layer_matmul, tiles


def shapes(c: int, ffn: int) -> list[tuple[int, int]]:
    """(K, N) of one block's weight gemms."""
    return [(c, 3 * c), (c, c), (c, c), (c, c), (c, ffn), (ffn, c)]


def scale_fn(mode: str, tile=None, stages: int = 4, warps: int = 4):
    """A scan over layers applying every gemm to its input; returns the sum of each output's first column.

    tile: a function (m, k, n) -> (block_m, block_n, block_k), or None for `tiles`' choice.
    """

    # The weights are arguments: as closed-over constants XLA would embed 4 GB in the program.
    def run(weights, inputs):
        def body(acc, xs):
            layer, sliced = xs
            for w, x, s in zip(weights, inputs, sliced, strict=True):
                if mode == "xla":
                    y = x @ s
                else:
                    y = layer_matmul(
                        x, w, layer, tile=tile and tile(x.shape[0], *w.shape[1:]), num_stages=stages, num_warps=warps
                    )
                acc = acc + y[:, 0].astype(jnp.float32)
            return acc, None

        depth = weights[0].shape[0]
        xs = (jnp.arange(depth), weights if mode == "xla" else [jnp.zeros((depth,))] * len(weights))
        return jax.lax.scan(body, jnp.zeros(inputs[0].shape[0], jnp.float32), xs)[0]

    return jax.jit(run)


def sweep(m: int, stages: int) -> list:
    """Other (tile function, stages, warps) to try at m rows: narrow deep tiles for a few rows, and from 256 rows
    the large tiles of compute-bound gemms (128 × 256 with 8 warps was 3.6 % faster than slice + cuBLAS at 2048)."""

    def tile(bm, bn, bk):
        return lambda mm, k, n: (bm or tiles(mm, k, n)[0], min(bn, n), min(bk, k))

    narrow = [(tile(None, bn, bk), stages, 4) for bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256))]
    large = [
        (tile(bm, bn, 64), st, w)
        for (bm, bn), st, w in itertools.product(((64, 256), (128, 128), (128, 256), (256, 128)), (3, 4), (4, 8))
    ]
    return (narrow if m <= 512 else []) + (large if m >= 256 else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--rows", default="2,8,32,72,128,288,512")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--stages", type=int, default=4, help="Triton pipeline stages")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    dims = shapes(args.width, args.ffn)
    weights = [jnp.asarray(rng.standard_normal((args.depth, k, n)) * 0.02, jnp.bfloat16) for k, n in dims]
    weight_bytes = sum(w.size * 2 for w in weights)
    print(f"{jax.devices()[0].device_kind}; weights {weight_bytes / 1e9:.2f} GB over {args.depth} layers")
    print("| rows | XLA sliced ms | GB/s | layer_matmul ms | GB/s | tile | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    for m in (int(r) for r in args.rows.split(",")):
        inputs = [jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16) for k, _ in dims]
        xla = scale_fn("xla")
        t_xla = median_seconds(lambda xla=xla, inputs=inputs: xla(weights, inputs), 2, args.repeats)
        candidates = [(None, args.stages, 4)] + (sweep(m, args.stages) if args.sweep else [])
        best = None
        for tile, stages, warps in candidates:
            used = f"{(tile or tiles)(m, args.width, args.width)}/s{stages}/w{warps}"
            try:
                fn = scale_fn("pallas", tile, stages, warps)
                t = median_seconds(lambda fn=fn, inputs=inputs: fn(weights, inputs), 2, args.repeats)
            except Exception as e:  # a tile Triton cannot build (shared memory): skip it
                print(f"  tile {used}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if args.sweep:
                print(f"  tile {used}: {t * 1e3:.3f} ms", flush=True)
            if best is None or t < best[0]:
                best = (t, used, fn)
        diff = float(jnp.max(jnp.abs(best[2](weights, inputs) - xla(weights, inputs))))
        print(
            f"| {m} | {t_xla * 1e3:.3f} | {weight_bytes / t_xla / 1e9:.0f} | {best[0] * 1e3:.3f} | "
            f"{weight_bytes / best[0] / 1e9:.0f} | {best[1]} | {diff:.3g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
