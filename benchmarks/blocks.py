"""Forward + backward of a transformer layout cut to a few blocks: the quick A/B for changes inside the blocks.

    python benchmarks/blocks.py                                   # 2B width, 4 blocks, 512² batch 8
    PYTHONPATH=/tmp/other_checkout python benchmarks/blocks.py   # the same cell on another version of the package
    python benchmarks/blocks.py --dump /tmp/hlo                  # also keep the optimized HLO of the step

The full training step (`train_step.py`) compiles for ~100 s at the 2B layout; this cell (scanned blocks,
rematerialisation, T5 features given with 32-token captions, a bitwise cross entropy on random bits) compiles in
~20 s, and a change in its time is the change per block (times the depth) of the step. It also counts the float32 [B, C, L] values of the optimized program:
activations laid out with the tokens minor, which XLA on GPU makes for reductions over the tokens and which cost
the 2B step at 512² transposes of every block's activations (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import median_seconds

from infinity_jax import schedules
from infinity_jax.models.transformer import Infinity, TransformerConfig, init_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="infinity_2b")
    parser.add_argument("--depth", type=int, default=4, help="blocks kept of the layout")
    parser.add_argument("--resolution", default="0.25M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attention", default="cudnn")
    parser.add_argument("--remat", default="dots_saveable")
    parser.add_argument("--unroll", action="store_true", help="one block per layer instead of nn.scan")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dump", help="folder for the optimized HLO of the step")
    args = parser.parse_args(argv)

    schedule = schedules.infinity_schedule(1.0, args.resolution)
    config = TransformerConfig.from_size(
        args.size,
        depth=args.depth,
        scan_blocks=not args.unroll,
        remat=args.remat,
        attention=args.attention,
        dtype="bfloat16",
    )
    model = Infinity(config)
    rng = np.random.default_rng(0)
    b, length = args.batch, schedule.num_tokens
    inputs = jnp.asarray(rng.standard_normal((b, length - 1, config.bits)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((b, 32, config.text_dim)), jnp.float32)
    mask = jnp.ones((b, 32), bool)
    bits = jnp.asarray(rng.integers(0, 2, (b, length, config.bits)), jnp.int32)
    params = jax.jit(lambda key: init_params(config, key, inputs[:1], schedule, text=text[:1], text_mask=mask[:1]))(
        jax.random.key(0)
    )

    # The batch is an argument, not a closure: XLA would constant-fold the gathers over baked-in arrays for seconds.
    def loss(params, inputs, text, mask, bits):
        logits = model.apply({"params": params}, inputs, schedule, text, mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), bits[..., None], axis=-1))

    start = time.perf_counter()
    batch = (inputs, text, mask, bits)
    step = jax.jit(jax.value_and_grad(loss)).lower(params, *batch).compile()
    compile_s = time.perf_counter() - start
    hlo = step.as_text()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, "blocks_step.txt"), "w") as f:
            f.write(hlo)
    tokens_minor = len(re.findall(rf"= \(?f32\[{b},{config.embed_dim},{length}\]", hlo))
    seconds = median_seconds(lambda: step(params, *batch), args.warmup, args.repeats)
    value, grads = step(params, *batch)
    grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
    print(f"Device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.size} cut to {args.depth} blocks")
    print("| res | batch | blocks | ms/step | compile s | f32 [B, C, L] values | loss | grad norm |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.resolution} | {b} | {args.depth} {'unrolled' if args.unroll else 'scanned'} | {seconds * 1e3:.1f} | "
        f"{compile_s:.0f} | {tokens_minor} | {float(value):.6f} | {grad_norm:.6e} |"
    )


if __name__ == "__main__":
    main()
