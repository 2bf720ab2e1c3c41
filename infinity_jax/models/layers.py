"""Building blocks of the next-scale transformer (REFERENCE §3.3–3.7), as Flax Linen modules.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `text_embed`, `bits`, …) and the
main activations are constrained to (`act_batch`, `act_len`, …), so one set of rules shards the model for data,
FSDP or tensor parallelism. Matmuls run in the module's `dtype` (bf16 in production); normalisations, AdaLN
modulation, RoPE and the residual stream stay float32, as in the official code.

Projections keep heads as their own axis ([C, 3, H, hd] instead of [C, 3C]) so that tensor parallelism splits
whole heads; converting an official checkpoint only reshapes.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from infinity_jax.ops.attention import CUDNN_READ_TILE, attention, prefix_attention
from infinity_jax.ops.layer_matmul import LayerKernel
from infinity_jax.ops.qkv_cache import fits as qkv_fits
from infinity_jax.ops.qkv_cache import qkv_into_cache
from infinity_jax.ops.residual_norm import residual_norm
from infinity_jax.ops.rope import normalized_rope
from infinity_jax.ops.splash import block_causal_attention

LN_EPS = 1e-6
GELU_NAME = "ffn_gelu"  # the FFN's GELU output, for remat policies that keep it by name
MAX_LOG_SCALE = math.log(100.0)  # the cap on cos-attention's learned per-head scale


def normal(std: float):
    # torch's trunc_normal_(std) truncates at ±2 in absolute value, i.e. at ±100σ for std ~0.02: a plain normal.
    return nn.initializers.normal(std)


def constrain(x, *axes):
    return nn.with_logical_constraint(x, axes)


def _normalized(x: jax.Array, eps: float = LN_EPS) -> tuple[jax.Array, jax.Array]:
    """x: [.., C] -> (x̂ = (x − mean)·rstd, rstd [.., 1]), float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)
    return (x - mean) * rstd, rstd


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    return _normalized(x, eps)[0]


def _sum_to(p: jax.Array, like: jax.Array) -> jax.Array:
    """p: [..., *like.shape[k:]] summed over its leading axes to `like`'s shape, where `like` is [B, 1, C] (summed
    over the tokens only) or has no batch axis ([C], [H, hd]: summed over batch and tokens), in float32.

    Written as ones · p, a matrix product: XLA on GPU lays a reduction over the tokens out by transposing its
    operand to tokens-minor, and the backward of every block then runs in a transposed [B, C, L] layout. The
    barrier hides that the left operand is all ones, which XLA would otherwise simplify back into a reduction.
    """
    p = p.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if like.ndim == 3 and like.shape[1] == 1:
        ones = jax.lax.optimization_barrier(jnp.ones(p.shape[:2], jnp.float32))
        return jnp.einsum("bl,blc->bc", ones, p, precision=hi)[:, None]
    rows = p.reshape(-1, *like.shape)
    ones = jax.lax.optimization_barrier(jnp.ones(rows.shape[:1], jnp.float32))
    return jnp.tensordot(ones, rows, axes=1, precision=hi)


@jax.custom_vjp
def bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias, both of one dtype. y: [..., *bias.shape]; the bias gradient is a `_sum_to` (see there)."""
    if y.dtype != bias.dtype:
        raise ValueError(f"bias_add: y is {y.dtype} but bias is {bias.dtype}; cast one first")
    return y + bias


def _bias_add_fwd(y, bias):
    return bias_add(y, bias), bias


def _bias_add_bwd(bias, dy):
    return dy, _sum_to(dy, bias).astype(bias.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


@jax.custom_vjp
def normalize_affine(x: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """LN(x)·mul + add in float32. x: [B, L, C]; mul, add: [B, 1, C] (AdaLN) or [C] (an affine LayerNorm).

    Its backward is written out: from x̂ recomputed once, two row means give dx and two sums over the tokens give
    d mul and d add. XLA's autodiff of the same formula spent ~4 % more of a 2B training step (benchmarks/RESULTS.md).
    """
    if mul.shape != add.shape:
        raise ValueError(f"normalize_affine: mul {mul.shape} and add {add.shape} must have one shape")
    return layer_norm(x) * mul + add


def _normalize_affine_fwd(x, mul, add):
    return normalize_affine(x, mul, add), (x, mul)


def _normalize_affine_bwd(residuals, dy):
    x, mul = residuals
    x_hat, rstd = _normalized(x)
    g = dy * mul
    mean = functools.partial(jnp.mean, axis=-1, keepdims=True)
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    return dx.astype(x.dtype), _sum_to(dy * x_hat, mul), _sum_to(dy, mul)


normalize_affine.defvjp(_normalize_affine_fwd, _normalize_affine_bwd)


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """AdaLN: LN(x)·(1 + scale) + shift, float32. x: [B, L, C]; scale, shift: [B, 1, C]."""
    return normalize_affine(x, 1.0 + scale, shift)


@jax.custom_vjp
def gated_residual(x: jax.Array, branch: jax.Array, gate: jax.Array) -> jax.Array:
    """x + branch·gate in x's dtype (the float32 residual stream). x, branch: [B, L, C]; gate: [B, 1, C].

    Its backward is written out, as `normalize_affine`'s.
    """
    return x + branch.astype(x.dtype) * gate


def _gated_residual_fwd(x, branch, gate):
    return gated_residual(x, branch, gate), (branch, gate)


def _gated_residual_bwd(residuals, dy):
    branch, gate = residuals
    return dy, (dy * gate).astype(branch.dtype), _sum_to(dy * branch.astype(dy.dtype), gate).astype(gate.dtype)


gated_residual.defvjp(_gated_residual_fwd, _gated_residual_bwd)


class Dense(nn.Module):
    """x · kernel (+ bias) contracting the last `in_dims` axes of x, with multi-axis outputs.

    Kernel [*in, *features] and bias [*features] are created at their full shape with logical names: flax's
    DenseGeneral hands a flattened shape to its initialiser, which breaks named sharding under a mesh.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    std: float
    in_dims: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: object = None

    @nn.compact
    def __call__(self, x):
        shape = (*x.shape[x.ndim - self.in_dims :], *self.features)
        init = self.kernel_init or normal(self.std)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape)
        # The output axes are one flat axis until the end, so that the bias is a vector along a matrix product's
        # columns: XLA then adds it in the gemm's epilogue, where a [heads, head_dim] bias was broadcast to the
        # output's full shape first and read back as the gemm's C matrix (one more kernel and write per call).
        if isinstance(kernel, LayerKernel):  # generation over stacked weights read in place (`BlockStack`)
            y = kernel.matmul(x.astype(kernel.dtype), self.in_dims)
            y = y.reshape(*y.shape[: y.ndim - len(self.features)], -1)
        else:
            contract = tuple(range(x.ndim - self.in_dims, x.ndim))
            flat = kernel.reshape(*kernel.shape[: self.in_dims], -1).astype(self.dtype)
            y = jax.lax.dot_general(x.astype(self.dtype), flat, ((contract, tuple(range(self.in_dims))), ((), ())))
        if self.use_bias:
            bias_axes = self.axes[self.in_dims :]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), self.features)
            y = bias_add(y, bias.reshape(-1).astype(self.dtype))
        return y.reshape(*y.shape[:-1], *self.features)


def dense(features, axes, *, std, name, in_dims=1, use_bias=True, dtype=jnp.float32, kernel_init=None):
    """A `Dense` with `features` an int or a tuple."""
    features = features if isinstance(features, tuple) else (features,)
    return Dense(features, axes, std, in_dims, use_bias, dtype, kernel_init, name=name)


class RMSNorm(nn.Module):
    """x·rsqrt(mean(x²) + eps)·w over the last axis, in float32 (the text features' norm)."""

    axis_name: str
    eps: float = LN_EPS

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],)
        )
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps) * scale


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias (the cross-attention's input norm), float32.

    `residual` also adds a gated branch to the stream first and returns both (generation's one-pass kernel).
    """

    features: int

    def setup(self):
        axes = ("embed",)
        self.scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes), (self.features,))
        self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), (self.features,))

    def __call__(self, x):
        return normalize_affine(x, self.scale, self.bias)

    def residual(self, x, branch, gate, out_dtype, interpret: bool = False):
        """(x + branch·gate, its LayerNorm in out_dtype) from one pass of `ops.residual_norm` (GPU, or
        `interpret` on CPU). x: [B, n, C] float32; branch: [B, n, C]; gate: [B, 1, C]."""
        return residual_norm(
            x, branch, gate, self.scale, self.bias, eps=LN_EPS, out_dtype=out_dtype, interpret=interpret
        )


class _Attention(nn.Module):
    """Fields shared by the self- and cross-attention layers."""

    num_heads: int
    head_dim: int
    std: float
    proj_std: float
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    @property
    def kernel(self) -> str:
        """The `ops.attention` kernel for unmasked/padded attention (splash only serves the block-causal mask)."""
        return "xla" if self.attention_impl.startswith("splash") else self.attention_impl


class SelfAttention(_Attention):
    """Cosine self-attention with 2D RoPE (optional) and an optional KV cache.

    q = normalize(x W_q + b_q) · exp(min(s_h, ln 100)), k = normalize(x W_k) (no key bias), v = x W_v + b_v;
    RoPE on q and k; softmax(q·k) v with scale 1; output projection. With a layer's own cache, RoPE and
    `kernels="pallas"` (or "pallas_interpret"), q and the cache's new rows come from `ops.qkv_cache`'s one pass
    where its tiles fit (`ops.qkv_cache.fits`; else XLA's passes, the same numbers).
    """

    kernels: str = "xla"

    @nn.compact
    def __call__(self, x, rope, schedule=None, cache=None, start: int = 0, layer=0):
        """x: [B, n, C]; rope: (cos, sin) [n, hd/2], or None (no RoPE: VAR's absolute positions); schedule: given in
        training, where x is the whole sequence under the schedule's block-causal mask; cache: (k, v)
        [depth, B, L, H, hd] of all layers (scanned blocks), or this layer's [B, L', H, hd] (unrolled), or None.

        With a cache, this layer's new keys/values are written in place at [(layer,) :, start : start + n] and the
        queries attend to the layer's first start + n rows (no mask: everything before is visible). The whole
        stack is one buffer so that generation never copies it; cuDNN reads a layer's own cache whole, bounded by
        key lengths. Returns (out [B, n, C], cache).
        """
        h, hd = self.num_heads, self.head_dim
        qkv = dense(
            (3, h, hd), ("embed", None, "heads", "kv"), std=self.std, use_bias=False, dtype=self.dtype, name="qkv"
        )(x)
        q_bias = self.param("q_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")), (h, hd))
        v_bias = self.param("v_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")), (h, hd))
        scale_mul = self.param(
            "scale_mul", nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)), ("heads",)), (h,)
        )
        scale = jnp.exp(jnp.minimum(scale_mul, MAX_LOG_SCALE))
        b, n = x.shape[:2]
        layer_cache = cache is not None and cache[0].ndim == 4  # this layer's own cache (unrolled blocks)
        # Zeros after the new rows, to the end of cuDNN's last read tile: the rows past them may be garbage
        # (`init_cache(uninitialized=True)`); the next scale overwrites the zeros.
        rows = (
            min(-(-(start + n) // CUDNN_READ_TILE) * CUDNN_READ_TILE, cache[0].shape[1]) - start if layer_cache else n
        )
        if layer_cache and rope is not None and self.kernels != "xla" and qkv_fits(h, hd):
            interpret = self.kernels == "pallas_interpret"
            q, *cache = qkv_into_cache(qkv, q_bias, v_bias, scale, *rope, *cache, start=start, rows=rows,
                                       interpret=interpret)  # fmt: skip
            return self._attend(q, tuple(cache), b, start + n)
        # As the promotion of qkv + bias: float32 in training (float32 biases), the compute dtype in inference.
        dtype = jnp.result_type(qkv, q_bias)
        q = bias_add(qkv[:, :, 0].astype(dtype), q_bias.astype(dtype))
        k, v = qkv[:, :, 1], bias_add(qkv[:, :, 2].astype(dtype), v_bias.astype(dtype))
        q = normalized_rope(q, rope, scale).astype(self.dtype)
        k = normalized_rope(k, rope).astype(self.dtype)
        q, k, v = (constrain(t, "act_batch", "act_len", "act_heads", "act_kv") for t in (q, k, v))
        if layer_cache:
            cache = tuple(
                jax.lax.dynamic_update_slice(
                    c, jnp.pad(t.astype(c.dtype), ((0, 0), (0, rows - n), (0, 0), (0, 0))), (0, start, 0, 0)
                )
                for c, t in zip(cache, (k, v), strict=True)
            )
            return self._attend(q, cache, b, start + n)
        if cache is not None:
            cache = tuple(
                jax.lax.dynamic_update_slice(c, t[None].astype(c.dtype), (layer, 0, start, 0, 0))
                for c, t in zip(cache, (k, v), strict=True)
            )
            k, v = (jax.lax.dynamic_slice(c, (layer, 0, 0, 0, 0), (1, b, start + n, h, hd))[0] for c in cache)
        if schedule is None:
            out = attention(q, k, v, scale=1.0, implementation=self.kernel)
        elif self.attention_impl.startswith("splash"):
            interpret = self.attention_impl == "splash_interpret"
            out = block_causal_attention(q, k, v, schedule, scale=1.0, interpret=interpret)
        else:
            out = prefix_attention(q, k, v, schedule, scale=1.0, implementation=self.kernel)
        return self._project(out), cache

    def _attend(self, q, cache, b: int, length: int):
        """Attention of q over the first `length` rows of a layer's own cache (k, v) [B, L', H, hd]: cuDNN reads
        the cache whole, bounded by key lengths; XLA takes the prefix. Returns (out [B, n, C], cache)."""
        if self.kernel == "cudnn":
            lengths = jnp.full((b,), length, jnp.int32)
            out = attention(q, *cache, scale=1.0, kv_lengths=lengths, implementation=self.kernel)
        else:
            out = attention(q, *(c[:, :length] for c in cache), scale=1.0, implementation=self.kernel)
        return self._project(out), cache

    def _project(self, out):
        proj = dense(
            self.head_dim * self.num_heads,
            ("heads", "kv", "embed"),
            std=self.proj_std,
            in_dims=2,
            dtype=self.dtype,
            name="proj",
        )
        return proj(out)


class CrossAttention(_Attention):
    """Each image token attends to its own caption's tokens (padding masked); no cos-attention here."""

    def setup(self):
        h, hd = self.num_heads, self.head_dim
        self.q = dense((h, hd), ("embed", "heads", "kv"), std=self.std, dtype=self.dtype, name=None)
        self.kv = dense(
            (2, h, hd), ("embed", None, "heads", "kv"), std=self.std, use_bias=False, dtype=self.dtype, name=None
        )
        self.v_bias = self.param(
            "v_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")), (h, hd)
        )
        self.proj = dense(h * hd, ("heads", "kv", "embed"), std=self.proj_std, in_dims=2, dtype=self.dtype, name=None)

    def project_memory(self, memory):
        """memory: [B, T, C] projected text -> its keys and values [B, T, 2, H, hd] (v with its bias)."""
        kv = self.kv(memory)
        # The bias is added in float32 and the sum rounded once, as attention would round it.
        return jnp.stack([kv[:, :, 0], (kv[:, :, 1] + self.v_bias).astype(kv.dtype)], axis=2)

    def __call__(self, x, memory, lengths, memory_kv=None):
        """x: [B, n, C]; memory: [B, T, C] (projected text); lengths: [B] int32, caption b fills the first
        lengths[b] of the T tokens; memory_kv: `project_memory(memory)` computed beforehand (its T may be padded
        further), or None -> [B, n, C]."""
        kv = self.project_memory(memory) if memory_kv is None else memory_kv
        # cuDNN's partitioner takes only queries, keys and values sharded alike; left to propagation, a large
        # model's queries and the caption's keys can come out sharded differently (8B at 1024² on 2 GPUs did).
        q, k, v = (
            constrain(t, "act_batch", None, "act_heads", "act_kv") for t in (self.q(x), kv[:, :, 0], kv[:, :, 1])
        )
        out = attention(
            q,
            k,
            v,
            scale=self.head_dim**-0.5,
            kv_lengths=lengths,
            implementation=self.kernel,
        )
        return self.proj(out)


class TextPool(nn.Module):
    """Attentive pooling of the text into one vector: the SOS token and the AdaLN condition (REFERENCE §3.3).

    One learned query per head attends over the caption; heads of width C/nh with nh = Ct5/128 (Ct5/64 above
    C = 4096), then a C×C projection.
    """

    embed_dim: int
    std: float

    @nn.compact
    def __call__(self, text, text_mask):
        """text: [B, T, Ct5] (normalised); text_mask: [B, T] bool -> [B, C] float32."""
        nh = text.shape[-1] // (128 if self.embed_dim <= 4096 else 64)
        hd = self.embed_dim // nh
        query = self.param("query", nn.with_logical_partitioning(normal(self.std), ("heads", "kv")), (nh, hd))
        kv = dense((2, nh, hd), ("text_embed", None, "heads", "kv"), std=self.std, use_bias=False, name="kv")(text)
        v_bias = self.param("v_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")), (nh, hd))
        q = jnp.broadcast_to(query[None, None], (text.shape[0], 1, nh, hd))
        lengths = jnp.sum(text_mask, axis=-1, dtype=jnp.int32)  # captions are padded at the end
        out = attention(q, kv[:, :, 0], kv[:, :, 1] + v_bias, scale=hd**-0.5, kv_lengths=lengths)
        return dense(self.embed_dim, ("heads", "kv", "embed"), std=self.std, in_dims=2, name="proj")(out)[:, 0]


class FFN(nn.Module):
    """fc2(GELU_tanh(fc1(x)))."""

    hidden: int
    std: float
    proj_std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = dense(self.hidden, ("embed", "mlp"), std=self.std, dtype=self.dtype, name="fc1")(x)
        h = checkpoint_name(constrain(nn.gelu(h, approximate=True), "act_batch", "act_len", "act_mlp"), GELU_NAME)
        return dense(c, ("mlp", "embed"), std=self.proj_std, dtype=self.dtype, name="fc2")(h)


def drop_path(x, rate, deterministic: bool, rng_module: nn.Module):
    """Stochastic depth per sample (timm semantics: kept paths scaled by 1/(1−rate)); rate may be traced."""
    if deterministic:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng_module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)
