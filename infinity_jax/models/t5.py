"""The T5 text encoder (Flan-T5 / T5 v1.1, and original T5), frozen, as a Flax Linen module (REFERENCE §3.3).

transformers 5.x has no Flax models, so this is our own encoder over the same weights. What makes T5 differ from a
textbook encoder: RMS norms without mean or bias, computed in float32; no 1/√d scaling of attention scores; one
table of bidirectional relative-position buckets (block 0) shared by every layer; a gated tanh-GELU FFN for
v1.1/Flan (ReLU for the original T5); no biases anywhere; no embedding scaling.

Module names mirror the Hugging Face state dict (`encoder.block.3.layer.1.DenseReluDense.wi_0.weight` ↔
`block_3/ffn/wi_0/kernel`), so `convert.t5` only renames and transposes.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

FEED_FORWARD = ("gated-gelu", "relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """One encoder layout (field names follow transformers' `T5Config`)."""

    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj must be one of {FEED_FORWARD}, got {self.feed_forward_proj!r}")

    @classmethod
    def from_hf(cls, hf_config) -> T5Config:
        """From a transformers `T5Config` (or its dict); "gated-gelu" and "gelu_new" spellings both mean gated."""
        values = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        fields = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        proj = fields.get("feed_forward_proj", "gated-gelu")
        fields["feed_forward_proj"] = "relu" if proj == "relu" else "gated-gelu" if "gelu" in proj else proj
        return cls(**fields)


# Flan-T5-XL, the encoder the released Infinity models use (Ct5 = 2048), and a tiny layout for tests and smoke runs
# (random weights; width 256 gives the text pooling two heads, so that it splits over a tensor axis of 2).
T5_LAYOUTS = {
    "flan_t5_xl": T5Config(),
    "tiny": T5Config(d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4),
}


def get_t5_layout(name: str) -> T5Config:
    if name not in T5_LAYOUTS:
        raise ValueError(f"unknown T5 layout {name!r}; valid: {', '.join(T5_LAYOUTS)}")
    return T5_LAYOUTS[name]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
    """[T, T] int32 bucket of (key − query) distances: exact up to num_buckets/4, log-spaced up to max_distance,
    separate halves for keys before and after the query."""
    position = jnp.arange(length)
    distance = position[None, :] - position[:, None]
    half = num_buckets // 2
    bucket = jnp.where(distance > 0, half, 0)
    n = jnp.abs(distance)
    exact = half // 2
    # log(0) at n = 0 is masked below; clamp to keep the where's other branch finite.
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    large = jnp.minimum(exact + (log_ratio * (half - exact)).astype(jnp.int32), half - 1)
    return bucket + jnp.where(n < exact, n, large)


class T5Norm(nn.Module):
    """x·rsqrt(mean(x²) + eps)·w in float32, cast back to the compute dtype (T5's layer norm)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("t5_embed",)), (x.shape[-1],))
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (weight * x).astype(self.dtype)


def _linear(features: int, axes, dtype, name: str):
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.05), axes),
        name=name,
    )


class T5Block(nn.Module):
    config: T5Config
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, _ = x.shape
        h = T5Norm(c.layer_norm_epsilon, self.dtype, name="attn_norm")(x)
        inner = c.num_heads * c.d_kv
        q, k, v = (
            _linear(inner, ("t5_embed", "t5_heads"), self.dtype, n)(h).reshape(b, t, c.num_heads, c.d_kv) for n in "qkv"
        )
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, inner)
        x = x + _linear(c.d_model, ("t5_heads", "t5_embed"), self.dtype, "o")(out)
        h = T5Norm(c.layer_norm_epsilon, self.dtype, name="ffn_norm")(x)
        if c.feed_forward_proj == "relu":
            h = nn.relu(_linear(c.d_ff, ("t5_embed", "t5_mlp"), self.dtype, "wi")(h))
        else:
            gate = _linear(c.d_ff, ("t5_embed", "t5_mlp"), self.dtype, "wi_0")(h)
            h = nn.gelu(gate, approximate=True) * _linear(c.d_ff, ("t5_embed", "t5_mlp"), self.dtype, "wi_1")(h)
        return x + _linear(c.d_model, ("t5_mlp", "t5_embed"), self.dtype, "wo")(h)


class T5Encoder(nn.Module):
    """tokens [B, T] int32 and mask [B, T] bool -> features [B, T, d_model] (float32 after the final norm)."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask):
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("t5_vocab", "t5_embed")),
            name="shared",
        )
        x = embed(tokens).astype(self.dtype)
        table = self.param(
            "relative_attention_bias",
            nn.with_logical_partitioning(nn.initializers.normal(0.05), (None, None)),
            (c.relative_attention_num_buckets, c.num_heads),
        )
        buckets = relative_position_buckets(
            tokens.shape[1], c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        # Padded keys get the most negative float32, as transformers does: a row of only padding stays finite.
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None] + jnp.where(
            mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min
        )
        for i in range(c.num_layers):
            x = T5Block(c, self.dtype, name=f"block_{i}")(x, bias)
        return T5Norm(c.layer_norm_epsilon, jnp.float32, name="final_norm")(x)
