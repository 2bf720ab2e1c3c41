"""x · W[layer] for one layer of a stack of kernels, reading that layer's slice where it lies (GPU, Pallas/Triton).

Generation runs the blocks as a scan over stacked weights [L, K, N]. XLA on GPU hands each gemm of a scan step a
copy of the layer's slice (an asynchronous dynamic-slice per weight matrix), so at the small scales, where a gemm
only streams its weights, every scale moves the 2B model's ~4 GB of block weights three times (read, write, read)
instead of once. This kernel takes the whole stack and the layer index and loads the tiles of that layer directly.

Tiles: each program computes a [block_m, block_n] tile of the output over the whole K, in steps of block_k. Small
tiles along N keep enough programs in flight to stream the weights at full bandwidth when M is a few rows.
`interpret=True` runs the same kernel on CPU (how it is tested).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _layer_matmul_kernel(layer_ref, x_ref, w_ref, o_ref, *, m: int, block_m: int, block_n: int, block_k: int,
                         k_steps: int):  # fmt: skip
    layer = layer_ref[0]
    start = pl.program_id(0) * block_m
    rows, columns = pl.ds(start, block_m), pl.ds(pl.program_id(1) * block_n, block_n)
    # The last row tile may run past M; its rows beyond M are neither read nor written (Triton blocks are not
    # bounds-checked). Masking here rather than padding x saves the pad's kernel launch for every gemm whose rows
    # are not a multiple of the tile.
    in_bounds = None if m % block_m == 0 else (start + jnp.arange(block_m) < m)[:, None]

    def step(s, acc):
        depth = pl.ds(s * block_k, block_k)
        x = x_ref[rows, depth] if in_bounds is None else pltriton.load(x_ref.at[rows, depth], mask=in_bounds, other=0)
        return acc + pltriton.dot(x, w_ref[layer, depth, columns])

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    pltriton.store(o_ref.at[rows, columns], acc.astype(o_ref.dtype), mask=in_bounds)


def tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) for an [m, k] · [k, n] product (powers of two, at least 16: Triton's dot).

    Measured on an H200 over the 2B block's gemms (`benchmarks/layer_matmul.py --sweep`): a few rows stream the
    weights fastest in narrow, deep tiles; from ~64 rows wider tiles reuse each weight tile across more rows.
    """
    block_m = min(64, max(16, pl.next_power_of_2(m)))
    block_n, block_k = (32, 256) if m <= 32 else (128, 128)
    while n % block_n:
        block_n //= 2
    while k % block_k:
        block_k //= 2
    return block_m, block_n, block_k


@functools.partial(jax.jit, static_argnames=("tile", "num_warps", "num_stages", "interpret"))
def layer_matmul(x, w, layer, *, tile=None, num_warps: int = 4, num_stages: int = 4, interpret: bool = False):
    """x · w[layer] with float32 accumulation.

    Args:
      x: [M, K]; w: [L, K, N] stacked kernels of x's dtype; layer: int32 scalar (traced: a scan's index).
      tile: (block_m, block_n, block_k), or None for `tiles`' choice.

    Returns:
      [M, N] in x's dtype.
    """
    (m, k), (_, k_w, n) = x.shape, w.shape
    if k_w != k or w.dtype != x.dtype:
        raise ValueError(f"layer_matmul: x {x.shape} {x.dtype} does not match kernels {w.shape} {w.dtype}")
    block_m, block_n, block_k = tile or tiles(m, k, n)
    if n % block_n or k % block_k:
        raise ValueError(f"layer_matmul: tile {(block_m, block_n, block_k)} does not divide K={k}, N={n}")
    return pl.pallas_call(
        functools.partial(
            _layer_matmul_kernel, m=m, block_m=block_m, block_n=block_n, block_k=block_k, k_steps=k // block_k
        ),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(pl.cdiv(m, block_m), n // block_n),
        in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0, bytes_accessed=x.dtype.itemsize * (m * k + k * n + m * n)
        ),
        interpret=interpret,
        name="layer_matmul",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x, w)


# Measured on an H200 (benchmarks/RESULTS.md): the kernel beats copy + cuBLAS up to 512 rows and loses from 800.
MAX_ROWS = 512


class LayerKernel:
    """One layer's kernel [*in, *out] of a stack [L, *in, *out], not sliced out: what a `Dense` receives as its
    parameter when the blocks of a generation run over stacked weights in place (`layer_matmul` does its product).

    It is no array: it has the layer's `shape` (so that flax's parameter shape check holds) and `dtype`.
    """

    def __init__(self, stack: jax.Array, layer: jax.Array, interpret: bool = False):
        self.stack, self.layer, self.interpret = stack, layer, interpret
        self.shape, self.dtype = stack.shape[1:], stack.dtype

    def matmul(self, x: jax.Array, in_dims: int) -> jax.Array:
        """x: [..., *in] (the kernel's dtype) contracted over its last `in_dims` axes -> [..., *out].

        Above MAX_ROWS rows the product is compute-bound, cuBLAS beats the kernel by more than the copy of the
        slice costs, and the slice is taken as usual.
        """
        lead, k = x.shape[: x.ndim - in_dims], math.prod(self.shape[:in_dims])
        out = self.shape[in_dims:]
        stack = self.stack.reshape(self.stack.shape[0], k, math.prod(out))  # a view: the layout is row-major
        x = x.reshape(-1, k)
        if x.shape[0] <= MAX_ROWS:
            y = layer_matmul(x, stack, self.layer, interpret=self.interpret)
        else:
            y = jnp.dot(x, stack[self.layer])
        return y.reshape(*lead, *out)
