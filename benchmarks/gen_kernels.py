"""The 1024² generation's heaviest pieces on their own, at the last scale's shapes: what a change to them gains.

    python benchmarks/gen_kernels.py                     # every section
    python benchmarks/gen_kernels.py --sections attention

Sections (2B width, CFG batch 2, scale 13 of the 1M schedule: 4096 new tokens over 10,521 keys):
  attention  the self-attention of one layer: cuDNN over the layer's cache bounded by the key length (what
             generation runs) against JAX's Mosaic GPU flash attention (`attention_mgpu`, Hopper) over the whole
             zero-padded cache, its padded keys' share of the softmax taken back out through the log-sum-exp.
  ffn        fc1 + bias + GELU + fc2 + bias at 8192 rows, compiled with XLA's defaults, without its Triton gemms
             and with cuBLASLt: the time, and whether the GELU landed in a gemm's epilogue.
  gemms      a block's six gemms at each scale's rows, with and without XLA's Triton gemms.
  norm       the gated residual + LayerNorm after the self-attention: XLA's kernels against `ops.residual_norm`.
  qkv        the queries and the cache's new rows from the q·k·v projection: XLA against `ops.qkv_cache`.
  dispatch   a call handed 800 parameter buffers against one handed 26 of the same bytes: the host's share of a
             generation call before its first kernel.

Times are per call, from 20 back-to-back calls after 3 warm-ups (the calls queue on the GPU, so this is its time).
"""

from __future__ import annotations

import argparse
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.kernels import inventory
from infinity_jax.models.layers import FFN, LN_EPS, gated_residual, normalize_affine
from infinity_jax.ops.attention import CUDNN_READ_TILE, attention
from infinity_jax.ops.qkv_cache import qkv_into_cache
from infinity_jax.ops.residual_norm import residual_norm
from infinity_jax.ops.rope import normalized_rope


def per_call_ms(fn, *args, warmup: int = 3, calls: int = 20) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def padded_keys_removed(out, lse2, n_pad: int):
    """Flash attention over keys of which the last `n_pad` are zero vectors with zero values: each added e^0 to
    the softmax denominator and nothing to its numerator. out: [B, T, H, D]; lse2: [B, H, T], log2 of the
    denominator. Returns the output over the real keys only, [B, T, H, D]."""
    share = n_pad * jnp.exp2(-lse2)  # the padded keys' part of the denominator
    return (out.astype(jnp.float32) / (1.0 - share).transpose(0, 2, 1)[..., None]).astype(out.dtype)


def section_attention(rows):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    b, h, d, n, length = 2, 16, 128, 4096, 10521
    buffer = 10752  # the cache rows rounded to 256; rows past `length` hold zeros (each scale writes them)
    keys = jax.random.split(jax.random.key(0), 3)

    def unit(key, shape, scale):
        x = jax.random.normal(key, shape, jnp.float32)
        return (scale * x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(jnp.bfloat16)

    q = unit(keys[0], (b, n, h, d), 8.0)  # cosine attention: unit vectors, the queries times exp(s_h)
    real = jnp.arange(buffer)[None, :, None, None] < length
    k = jnp.where(real, unit(keys[1], (b, buffer, h, d), 1.0), 0)
    v = jnp.where(real, jax.random.normal(keys[2], (b, buffer, h, d), jnp.bfloat16), 0)
    lengths = jnp.full((b,), length, jnp.int32)
    flops = 4 * b * h * n * length * d

    cudnn = jax.jit(lambda q, k, v: attention(q, k, v, scale=1.0, kv_lengths=lengths, implementation="cudnn"))
    reference = cudnn(q, k, v)
    ms = per_call_ms(cudnn, q, k, v)
    rows.append(f"| attention | cuDNN, key lengths | {ms:.3f} | {flops / ms / 1e9:.0f} | – |")
    # This kernel stages its tiles as float16 (q·exp(s_h) ≤ 100, unit keys and the values fit its range).
    q16, k16, v16 = (t.astype(jnp.float16) for t in (q, k, v))
    for block_q, block_kv, steps in ((64, 64, 2), (64, 128, 2), (64, 64, 4), (64, 128, 3), (128, 64, 2)):
        config = mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps)

        def flash(q, k, v, config=config):
            out, (lse2,) = mgpu.attention(q, k, v, config, save_residuals=True)
            return padded_keys_removed(out, lse2, buffer - length)

        try:
            fn = jax.jit(flash)
            err = float(jnp.max(jnp.abs(fn(q16, k16, v16).astype(jnp.float32) - reference.astype(jnp.float32))))
            ms = per_call_ms(fn, q16, k16, v16)
            rows.append(f"| attention | mgpu f16 q{block_q} kv{block_kv} ×{steps} + pad correction | {ms:.3f} | "
                        f"{flops / ms / 1e9:.0f} | max |Δ| vs cuDNN {err:.2e} |")  # fmt: skip
        except Exception as e:  # a tile that does not fit shared memory, or no Mosaic GPU on this host
            rows.append(f"| attention | mgpu q{block_q} kv{block_kv} | – | – | {type(e).__name__}: {str(e)[:80]} |")


def section_ffn(rows, m: int = 8192):
    c, hidden = 2048, 8192
    ffn = FFN(hidden, 0.02, 0.02, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (m, c), jnp.bfloat16)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), ffn.init(jax.random.key(1), x[:8]))
    params = jax.tree.map(lambda p: p + 0.01 if p.ndim == 1 else p, params)  # nonzero biases, as trained ones
    flops = 2 * 2 * m * c * hidden
    options = {
        "defaults": None,
        "no Triton gemms": {"xla_gpu_enable_triton_gemm": False},
        "cuBLASLt": {"xla_gpu_enable_cublaslt": True},
        "cuBLASLt, no Triton gemms": {"xla_gpu_enable_cublaslt": True, "xla_gpu_enable_triton_gemm": False},
    }
    reference = None
    for name, opts in options.items():
        compiled = jax.jit(ffn.apply).lower(params, x).compile(compiler_options=opts)
        hlo = compiled.as_text()
        epilogues = sorted(set(re.findall(r'"epilogue":"([A-Z_]+)"', hlo)))
        launches = sum(inventory(hlo).launches.values())
        out = compiled(params, x).astype(jnp.float32)
        reference = out if reference is None else reference
        err = float(jnp.max(jnp.abs(out - reference)))
        ms = per_call_ms(compiled, params, x)
        rows.append(f"| ffn | {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {launches} kernels, epilogues "
                    f"{','.join(epilogues) or '–'}, max |Δ| {err:.1e} |")  # fmt: skip


def section_gemms(rows):
    """A block's six gemms (qkv, proj, ca.q, ca.proj, fc1 + GELU, fc2) at each scale's rows, with and without
    XLA's Triton gemms: a program-wide option, so it pays only if it is no slower at any scale."""
    c, hidden = 2048, 8192
    shapes = {
        "qkv": (c, 3 * c),
        "proj": (c, c),
        "ca_q": (c, c),
        "ca_proj": (c, c),
        "fc1": (c, hidden),
        "fc2": (hidden, c),
    }
    weights = {
        k: 0.02 * jax.random.normal(jax.random.key(i), s, jnp.bfloat16) for i, (k, s) in enumerate(shapes.items())
    }
    biases = {k: jnp.full((s[1],), 0.01, jnp.bfloat16) for k, s in shapes.items()}

    def chain(w, bias, x):
        y = x @ w["qkv"] + bias["qkv"]
        x = x + (y[:, :c] @ w["proj"] + bias["proj"])
        x = x + ((x @ w["ca_q"] + bias["ca_q"]) @ w["ca_proj"] + bias["ca_proj"])
        return x + (jax.nn.gelu(x @ w["fc1"] + bias["fc1"], approximate=True) @ w["fc2"] + bias["fc2"])

    flops_per_row = 2 * sum(k * n for k, n in shapes.values()) + 2 * c * c
    for m in (2, 8, 32, 128, 288, 512, 800, 1152, 2048, 3200, 4608, 8192):
        x = jax.random.normal(jax.random.key(9), (m, c), jnp.bfloat16)
        times = []
        for opts in (None, {"xla_gpu_enable_triton_gemm": False}):
            compiled = jax.jit(chain).lower(weights, biases, x).compile(compiler_options=opts)
            times.append(per_call_ms(compiled, weights, biases, x, calls=50))
        rows.append(f"| gemms | {m} rows: defaults / no Triton gemms | {times[0]:.4f} / {times[1]:.4f} | "
                    f"{flops_per_row * m / times[0] / 1e9:.0f} / {flops_per_row * m / times[1] / 1e9:.0f} | "
                    f"Δ {1e3 * (times[1] - times[0]):+.1f} µs |")  # fmt: skip


def section_norm(rows):
    """The gated residual and the cross-attention's LayerNorm after a block's self-attention: XLA's two kernels
    against `ops.residual_norm`'s one pass, at scale 13, 9 and 1 (CFG: 2 × tokens rows)."""
    c = 2048
    r = np.random.default_rng(0)
    for n in (4096, 576, 1):
        x = jnp.asarray(r.standard_normal((2, n, c)), jnp.float32)
        branch = jnp.asarray(r.standard_normal((2, n, c)), jnp.bfloat16)
        gate = jnp.asarray(r.standard_normal((2, 1, c)), jnp.float32)
        mul, add = (jnp.asarray(r.standard_normal((c,)), jnp.float32) for _ in range(2))

        def xla(x, branch, gate, mul, add):
            x = gated_residual(x, branch, gate)
            return x, normalize_affine(x, mul, add).astype(jnp.bfloat16)

        fused = jax.jit(functools.partial(residual_norm, eps=LN_EPS))
        xla = jax.jit(xla)
        args = (x, branch, gate, mul, add)
        errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip(fused(*args), xla(*args), strict=True)]  # fmt: skip
        times = [per_call_ms(fn, *args, calls=100) * 1e3 for fn in (xla, fused)]
        traffic = x.size * (4 + 2 + 4 + 2) / times[1] / 1e3  # bytes per µs / 1e3 = GB/s
        rows.append(f"| norm | {2 * n} rows: XLA / residual_norm | {times[0]:.1f} / {times[1]:.1f} µs | – | "
                    f"one pass at {traffic:.0f} GB/s; max |Δ| x {errs[0]:.1e}, h {errs[1]:.1e} |")  # fmt: skip


def section_qkv(rows):
    """The queries and the cache's new rows from the q·k·v projection: XLA's kernels (bias, normalize, RoPE,
    cache writes) against `ops.qkv_cache`'s one pass, at scales 13, 9 and 1 of the 1M schedule."""
    h, hd, cache_rows = 16, 128, 10560
    r = np.random.default_rng(0)
    for n, start in ((4096, 6425), (576, 921), (1, 0)):
        rows_ = min(-(-(start + n) // CUDNN_READ_TILE) * CUDNN_READ_TILE, cache_rows) - start
        qkv = jnp.asarray(r.standard_normal((2, n, 3, h, hd)), jnp.bfloat16)
        q_bias, v_bias = (jnp.asarray(r.standard_normal((h, hd)), jnp.bfloat16) for _ in range(2))
        scale = jnp.asarray(r.uniform(1, 100, h), jnp.float32)
        angles = r.uniform(0, 6, (n, hd // 2))
        cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
        cache = tuple(jnp.full((2, cache_rows, h, hd), 7, jnp.bfloat16) for _ in range(2))

        def xla(qkv, q_bias, v_bias, scale, cos, sin, k_cache, v_cache, n=n, start=start, rows_=rows_):
            q = normalized_rope(qkv[:, :, 0] + q_bias, (cos, sin), scale).astype(jnp.bfloat16)
            k = normalized_rope(qkv[:, :, 1], (cos, sin)).astype(jnp.bfloat16)
            v = qkv[:, :, 2] + v_bias
            pad = ((0, 0), (0, rows_ - n), (0, 0), (0, 0))
            k_cache, v_cache = (jax.lax.dynamic_update_slice(c, jnp.pad(t, pad), (0, start, 0, 0))
                                for c, t in ((k_cache, k), (v_cache, v)))  # fmt: skip
            return q, k_cache, v_cache

        fused = jax.jit(functools.partial(qkv_into_cache, start=start, rows=rows_), donate_argnums=(6, 7))
        xla = jax.jit(xla, donate_argnums=(6, 7), static_argnames=("n", "start", "rows_"))
        args = (qkv, q_bias, v_bias, scale, cos, sin)
        outs = [fn(*args, *(jnp.copy(c) for c in cache)) for fn in (fused, xla)]
        errs = [
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(*outs, strict=True)
        ]
        times = []
        for fn in (xla, fused):
            state = [jnp.copy(c) for c in cache]
            for _ in range(3):
                _, *state = fn(*args, *state)
            jax.block_until_ready(state)
            start_time, calls = time.perf_counter(), 100
            for _ in range(calls):
                _, *state = fn(*args, *state)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - start_time) / calls * 1e6)
        rows.append(f"| qkv | {2 * n} rows: XLA / qkv_into_cache | {times[0]:.1f} / {times[1]:.1f} µs | – | "
                    f"max |Δ| q {errs[0]:.1e}, k cache {errs[1]:.1e}, v cache {errs[2]:.1e} |")  # fmt: skip


def section_dispatch(rows):
    total = 4 * 2**30  # bytes of bf16 parameters, as the 2B blocks
    for count in (800, 26):
        size = total // count // 2
        params = [jnp.full((size,), i, jnp.bfloat16) for i in range(count)]
        fn = jax.jit(lambda ps: ps[0][:8] + ps[-1][:8])
        ms = per_call_ms(fn, params, calls=200)
        rows.append(f"| dispatch | {count} buffers of {size * 2 / 2**20:.0f} MiB | {ms:.3f} | – | – |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="attention,ffn,gemms,norm,qkv,dispatch")
    parser.add_argument("--ffn-rows", type=int, default=8192, help="rows of the ffn section (scale 13: 8192)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    rows = ["| section | variant | ms per call | TFLOP/s | notes |", "|---|---|---|---|---|"]
    sections = {
        "attention": section_attention,
        "ffn": lambda rows: section_ffn(rows, args.ffn_rows),
        "dispatch": section_dispatch,
        "gemms": section_gemms,
        "norm": section_norm,
        "qkv": section_qkv,
    }
    for name in args.sections.split(","):
        sections[name](rows)
        print("\n".join(rows), flush=True)
    print(f"\nDevice: {device.device_kind}; jax {jax.__version__}")


if __name__ == "__main__":
    main()
