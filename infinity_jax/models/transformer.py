"""The next-scale transformer: Infinity's bitwise classifier (REFERENCE §3, §5) and VAR's codebook classifier (§9).

`Infinity` conditions on text (T5 features, padded, with a mask) or on class labels (an embedding with a null
class for guidance), and predicts every bit of every token of a scale from all coarser scales:

    condition ─▶ cond [B, C] (SOS and AdaLN input) ─▶ gss = shared AdaLN [B, 6, C]
    tokens: [SOS + pos_start ; word_embed(inputs of scales 2..K)] + lvl_embed[scale]        (before block 0)
    depth × Block: AdaLN self-attention (cos-attn, 2D RoPE) → cross-attention to the text → AdaLN FFN
    head: AdaLN(cond) → Linear(C, 2d) read as logits [B, L, d, 2]

VAR is the same network with three differences, all config fields: learned absolute positions added to the
tokens instead of RoPE (`positions="absolute"`, a [L, C] table for one schedule), a head over its VQ codebook
(`vocab` = 4096: logits [B, L, V]) and per-block AdaLN projections (`shared_aln=False`, except d36).

Methods, all pure functions of the parameters: `__call__` (training: the whole sequence under the block-causal
mask), `condition`, `step` (one scale against a KV cache, for generation), `embed`, `sos`, `logits`,
`init_cache`. Blocks are a Python loop or an `nn.scan` with a named remat policy (`scan_blocks`, `remat`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from infinity_jax.models import sizes
from infinity_jax.models.layers import (
    FFN,
    GELU_NAME,
    AffineLayerNorm,
    CrossAttention,
    RMSNorm,
    SelfAttention,
    TextPool,
    constrain,
    dense,
    drop_path,
    gated_residual,
    modulate,
    normal,
)
from infinity_jax.ops.attention import CUDNN_BLOCK, IMPLEMENTATIONS
from infinity_jax.ops.layer_matmul import LayerKernel
from infinity_jax.ops.residual_norm import fits as residual_norm_fits
from infinity_jax.ops.rope import rope_table
from infinity_jax.schedules import Schedule, var_schedule

# Splash attention (the TPU kernel, or the same kernel interpreted on CPU for tests) serves the training mask;
# generation and cross-attention then use XLA's kernel.
ATTENTIONS = (*IMPLEMENTATIONS, "splash", "splash_interpret")
REMAT_POLICIES = (
    "none",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "dots_and_gelu_saveable",
)
LAYER_WEIGHTS = ("slice", "in_place", "in_place_interpret")
GENERATION_KERNELS = ("xla", "pallas", "pallas_interpret")
# Special initialisation of the released training recipe (REFERENCE §3.8): AdaLN gates ×5e-6, AdaLN
# scale/shift ×1e-3, head ×0.02, residual output projections ×1/√(2·depth).
ALN_GAMMA_INIT, ALN_INIT, HEAD_INIT = 5e-6, 1e-3, 0.02


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One transformer layout plus how to run it.

    cond: "text" (Infinity: T5 features, cross-attention) or "class" (labels, no cross-attention).
    bits: bits per token (d; 4·d for the patchified 8B tokenizer); logits are [.., bits, 2].
    dtype: compute dtype of the blocks ("float32" or "bfloat16"); parameters are float32.
    scan_blocks / remat: run the blocks as one `nn.scan` (parameters stacked on a "layers" axis) and
      rematerialise each block with a `jax.checkpoint_policies` policy ("none" keeps activations).
    remat_free: with unrolled blocks, the last `remat_free` blocks keep all their activations: memory left over
      by the policy buys back those blocks' recomputation.
    attention: "xla" or "cudnn" kernel, or "splash" (TPU; "splash_interpret" on CPU) for the training mask.
    positions: "rope" (Infinity's 2D RoPE in self-attention) or "absolute" (VAR: a learned [num_positions, C]
      table added to the tokens, for schedules of at most num_positions tokens).
    vocab: 0 for the bitwise head (logits [.., bits, 2]); V > 0 for a head over a V-entry codebook ([.., V]).
      `bits` is then the width of the input features (VAR's Cvae).
    layer_weights: how scanned blocks with a KV cache (generation) read each layer's weights: "slice" (the
      scan hands every layer its slice, which XLA on GPU copies out of the stacks) or "in_place" (the gemms read
      the stacks at the layer's offset, `ops.layer_matmul`; GPU, one device, kernels in the compute dtype;
      "in_place_interpret" runs it on CPU).
    generation_kernels: how generation runs the memory-bound passes around a block's self-attention: "xla", or
      "pallas" (GPU; "pallas_interpret" on CPU): the queries and the cache's new keys and values from one pass
      over the q·k·v projection (`ops.qkv_cache`, unrolled blocks with RoPE), and the attention's gated residual
      with the cross-attention's LayerNorm (`ops.residual_norm`). Training always takes XLA's path.
    """

    depth: int
    embed_dim: int
    num_heads: int
    ffn_dim: int
    bits: int = 32
    cond: str = "text"
    shared_aln: bool = True
    drop_path: float = 0.0
    text_dim: int = sizes.TEXT_DIM
    text_maxlen: int = sizes.TEXT_MAXLEN
    num_classes: int = 1000
    num_levels: int = sizes.NUM_LEVEL_EMBEDDINGS
    dtype: str = "float32"
    scan_blocks: bool = False
    remat: str = "none"
    remat_free: int = 0
    attention: str = "xla"
    positions: str = "rope"
    num_positions: int = 0
    vocab: int = 0
    layer_weights: str = "slice"
    generation_kernels: str = "xla"

    def __post_init__(self):
        if self.cond not in ("text", "class"):
            raise ValueError(f"cond must be 'text' or 'class', got {self.cond!r}")
        if self.positions not in ("rope", "absolute"):
            raise ValueError(f"positions must be 'rope' or 'absolute', got {self.positions!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.positions == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a multiple of 4 (RoPE)")
        if self.positions == "absolute" and self.num_positions < 1:
            raise ValueError("absolute positions need num_positions > 0 (the schedule's token count L)")
        if self.vocab < 0:
            raise ValueError(f"vocab must be 0 (bitwise head) or a codebook size, got {self.vocab}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        # (With remat "none" there is nothing to leave out: inference copies of a training config keep the field.)
        if not 0 <= self.remat_free <= self.depth or (self.remat_free and self.scan_blocks and self.remat != "none"):
            raise ValueError(
                f"remat_free={self.remat_free} needs unrolled blocks (scan_blocks=False) and at most depth="
                f"{self.depth} blocks; got scan_blocks={self.scan_blocks}, remat={self.remat!r}"
            )
        if self.layer_weights not in LAYER_WEIGHTS:
            raise ValueError(f"unknown layer_weights {self.layer_weights!r}; valid: {', '.join(LAYER_WEIGHTS)}")
        if self.layer_weights != "slice" and not (self.scan_blocks and self.dtype == "bfloat16"):
            raise ValueError(
                f"layer_weights={self.layer_weights!r} needs scanned blocks in bfloat16 (generate.for_inference's "
                "layout), got scan_blocks={self.scan_blocks}, dtype={self.dtype}"
            )
        if self.generation_kernels not in GENERATION_KERNELS:
            raise ValueError(
                f"unknown generation_kernels {self.generation_kernels!r}; valid: {', '.join(GENERATION_KERNELS)}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTIONS)}")
        pool_head = 128 if self.embed_dim <= 4096 else 64
        if self.cond == "text" and (self.text_dim % pool_head or self.embed_dim % (self.text_dim // pool_head)):
            raise ValueError(
                f"text_dim {self.text_dim} must be a multiple of {pool_head} and embed_dim {self.embed_dim} divisible by "
                f"text_dim/{pool_head} (the text pooling's heads)"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @classmethod
    def from_size(cls, name: str, schedule: Schedule | None = None, **overrides) -> TransformerConfig:
        """A layout from the size table. Infinity sizes condition on text; VAR sizes are VAR itself (classes,
        absolute positions and level embeddings of `schedule`, default `var_schedule(256)`, a 4096-way head)."""
        size = sizes.get_size(name)
        fields = {
            f: getattr(size, f) for f in ("depth", "embed_dim", "num_heads", "ffn_dim", "drop_path", "shared_aln")
        }
        if size.family == "var":
            schedule = schedule or var_schedule(256)
            fields.update(cond="class", positions="absolute", vocab=sizes.VAR_CODEBOOK_SIZE, bits=sizes.VAR_VAE_DIM)
            fields.update(num_positions=schedule.num_tokens, num_levels=schedule.num_scales)
        else:
            fields["cond"] = "text"
        return cls(**{**fields, **overrides})

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def init_std(self) -> float:
        return math.sqrt(1.0 / (3 * self.embed_dim))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def _row_scaled(std: float, row_scales):
    """normal(std) with the 6 AdaLN rows (axis −2 of a [.., 6, C] parameter) scaled: gates and scale/shift
    start small."""

    def init(key, shape, dtype=jnp.float32):
        return normal(std)(key, shape, dtype) * jnp.asarray(row_scales, dtype)[:, None]

    return init


ADALN_ROWS = (ALN_GAMMA_INIT,) * 2 + (ALN_INIT,) * 4  # (γ1, γ2, s1, s2, b1, b2)


@struct.dataclass
class Condition:
    """What every position of one batch is conditioned on.

    cond: [B, C] pooled text or class embedding (SOS, head AdaLN). adaln: [B, 6, C] shared AdaLN (gss), or
    cond itself when each block has its own AdaLN. memory: [B, T, C] projected text for cross-attention (None
    for class conditioning); memory_lengths: [B] int32, each caption's length (captions are padded at the end;
    counted once here, not in every block). memory_kv: every block's cross-attention keys and values of the
    memory, [depth, B, T', 2, H, hd] (`MemoryKV`, computed once per generation; T' ≥ T is padded for cuDNN), or
    None (each block projects the memory itself).
    """

    cond: jax.Array
    adaln: jax.Array
    memory: jax.Array | None = None
    memory_lengths: jax.Array | None = None
    memory_kv: jax.Array | None = None


@struct.dataclass
class BlockContext:
    """Per-call inputs shared by all blocks: conditioning, RoPE rows of the tokens (None with absolute positions),
    guidance weight, and, in training, the schedule (static) whose block-causal mask the whole sequence attends
    under."""

    condition: Condition
    rope: tuple[jax.Array, jax.Array] | None
    cfg: jax.Array | None = None
    schedule: Schedule | None = struct.field(pytree_node=False, default=None)


def _heads(c: TransformerConfig) -> dict:
    """The attention layers' fields of a block."""
    std = c.init_std
    return dict(
        num_heads=c.num_heads,
        head_dim=c.head_dim,
        std=std,
        proj_std=std / math.sqrt(2 * c.depth),
        dtype=c.compute_dtype,
        attention_impl=c.attention,
    )


class Block(nn.Module):
    """AdaLN self-attention, cross-attention (text), AdaLN FFN; residual stream in float32 (REFERENCE §3.5).

    Called as ((x, cache), ctx, (layer_index, drop_rate)) so that it scans over layers with the KV cache of all
    layers in the carry (updated in place; None in training). With cfg_layer >= 0 the
    batch is [cond; uncond] and after layer `cfg_layer` the hidden states become cfg·cond + (1−cfg)·uncond
    (duplicated), the official "CFG on hidden states" option.
    """

    config: TransformerConfig
    start: int = 0
    deterministic: bool = True
    cfg_layer: int = -1

    @nn.compact
    def __call__(self, carry, ctx: BlockContext, xs):
        (x, cache), (layer, rate) = carry, xs
        c, std, heads = self.config, self.config.init_std, _heads(self.config)
        dtype = c.compute_dtype
        if c.shared_aln:
            gss = self.param(
                "ada_gss",
                nn.with_logical_partitioning(_row_scaled(c.embed_dim**-0.5, ADALN_ROWS), (None, "embed")),
                (6, c.embed_dim),
            )
            mod = ctx.condition.adaln + gss
        else:
            ada = dense(
                (6, c.embed_dim),
                ("embed", None, "embed_out"),
                std=std,
                kernel_init=_row_scaled(std, ADALN_ROWS),
                name="ada_lin",
            )
            mod = ada(nn.silu(ctx.condition.adaln))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (mod[:, None, i] for i in range(6))
        attn, cache = SelfAttention(**heads, kernels=c.generation_kernels, name="sa")(
            modulate(x, scale1, shift1).astype(dtype), ctx.rope, ctx.schedule, cache, self.start, layer
        )
        # drop_path scales whole samples, so it may act on the branch before the gate.
        attn = drop_path(attn, rate, self.deterministic, self)
        if ctx.condition.memory is not None:
            ca_norm = AffineLayerNorm(c.embed_dim, name="ca_norm")
            # Generation (no gradient needed), where Triton's tiles fit the width; else XLA's passes, same numbers.
            if cache is not None and c.generation_kernels != "xla" and residual_norm_fits(c.embed_dim):
                interpret = c.generation_kernels == "pallas_interpret"
                x, h = ca_norm.residual(x, attn, gamma1, dtype, interpret=interpret)
            else:
                x = gated_residual(x, attn, gamma1)
                h = ca_norm(x).astype(dtype)
            memory_kv = ctx.condition.memory_kv
            memory_kv = None if memory_kv is None else memory_kv[layer]
            cross = CrossAttention(**heads, name="ca")(
                h, ctx.condition.memory.astype(dtype), ctx.condition.memory_lengths, memory_kv
            )
            x = x + cross.astype(jnp.float32)
        else:
            x = gated_residual(x, attn, gamma1)
        ffn = FFN(c.ffn_dim, std, heads["proj_std"], dtype, name="ffn")(modulate(x, scale2, shift2).astype(dtype))
        x = gated_residual(x, drop_path(ffn, rate, self.deterministic, self), gamma2)
        x = constrain(x, "act_batch", "act_len", "act_embed")
        if self.cfg_layer >= 0:
            half = x.shape[0] // 2
            mixed = ctx.cfg * x[:half] + (1.0 - ctx.cfg) * x[half:]
            # As the official sampler, a scale with cfg = 1 is left unmixed.
            x = jnp.where((layer == self.cfg_layer) & (ctx.cfg != 1.0), jnp.concatenate([mixed, mixed]), x)
        return (x, cache), None


def remat_policy(name: str):
    """The `jax.checkpoint_policies` policy of a `REMAT_POLICIES` name.

    The dots policies also keep cuDNN's fused attention outputs (the attention and its softmax statistics): with
    XLA's attention they keep its products, being dot_generals, but cuDNN's kernel is one primitive that JAX's
    policies do not know, so the backward ran the attention forward again (~8.6 TFLOP per 512² batch-8 step of the
    2B layout) to save ~5 GiB. "dots_and_gelu_saveable" also keeps the FFN's GELU output (`layers.GELU_NAME`,
    [B, L, 4C] per block): the backward needs it for fc2's weight gradient, and under `dots_saveable` it is
    computed again, which at the 2B layout writes more bytes than any other kernel of the recompute.
    """
    policies = jax.checkpoint_policies
    if name == "dots_and_gelu_saveable":
        dots = policies.save_from_both_policies(policies.dots_saveable, policies.save_only_these_names(GELU_NAME))
    elif name in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        dots = getattr(policies, name)
    else:
        return getattr(policies, name)
    return policies.save_from_both_policies(dots, _fused_attention_saveable)


def _fused_attention_saveable(prim, *_, **__) -> bool:
    # jax.nn.dot_product_attention(implementation="cudnn") binds "dot_product_attention_fwd_wrapper".
    return prim.name.startswith("dot_product_attention_fwd")


class BlockStack(nn.Module):
    """`depth` blocks: a Python loop (parameters block_0 … block_{n−1}) or one `nn.scan` (stacked under "layers")."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, x, ctx: BlockContext, cache=None, start: int = 0, deterministic: bool = True, cfg_layer: int = -1
    ):
        c = self.config
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=remat_policy(c.remat), prevent_cse=not c.scan_blocks)
        rates = jnp.linspace(0.0, c.drop_path, c.depth)  # stochastic depth grows with depth
        attrs = dict(start=start, deterministic=deterministic, cfg_layer=cfg_layer)
        if c.scan_blocks and cache is not None and c.layer_weights != "slice" and not self.is_initializing():
            return self._in_place(x, ctx, cache, attrs)
        if c.scan_blocks:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, _ = scanned(c, **attrs, name="layers")((x, cache), ctx, (jnp.arange(c.depth), rates))
            return carry
        layer_caches = []
        for i in range(c.depth):
            layer_cache = None if cache is None else cache[i]
            kind = Block if i >= c.depth - c.remat_free else block
            (x, layer_cache), _ = kind(c, **attrs, name=f"block_{i}")((x, layer_cache), ctx, (jnp.int32(i), rates[i]))
            layer_caches.append(layer_cache)
        return x, None if cache is None else tuple(layer_caches)

    def _in_place(self, x, ctx: BlockContext, cache, attrs: dict):
        """The scanned blocks with every layer's dense kernels left in their stacks (`LayerKernel`); the other
        (small) parameters are packed into one [depth, P] stack per dtype, so that a layer step cuts them out with
        one dynamic slice per dtype instead of one per parameter: each slice is a kernel launch, and at the small
        scales a layer step is bound by its launches."""
        c = self.config
        stacks = nn.unbox(self.variables["params"]["layers"])
        interpret = c.layer_weights == "in_place_interpret"
        leaves, treedef = jax.tree_util.tree_flatten_with_path(stacks)
        # Per leaf: "stack" (a kernel read in place), "slice" (a kernel in another dtype: sliced and cast, as
        # before) or "packed".
        kinds = [
            ("stack" if leaf.dtype == c.compute_dtype else "slice") if path[-1].key == "kernel" else "packed"
            for path, leaf in leaves
        ]
        small = [leaf for (_, leaf), kind in zip(leaves, kinds, strict=True) if kind == "packed"]
        dtypes = sorted({leaf.dtype.name for leaf in small})
        packed = {
            d: jnp.concatenate([x.reshape(c.depth, -1) for x in small if x.dtype.name == d], axis=1) for d in dtypes
        }

        def body(carry, layer):
            rows = {d: p[layer] for d, p in packed.items()}
            offsets = dict.fromkeys(dtypes, 0)
            params = []
            for (_, leaf), kind in zip(leaves, kinds, strict=True):
                if kind == "packed":
                    d, size = leaf.dtype.name, math.prod(leaf.shape[1:])
                    params.append(rows[d][offsets[d] : offsets[d] + size].reshape(leaf.shape[1:]))
                    offsets[d] += size
                else:
                    params.append(LayerKernel(leaf, layer, interpret) if kind == "stack" else leaf[layer])
            params = jax.tree.unflatten(treedef, params)
            return Block(c, **attrs, parent=None).apply({"params": params}, carry, ctx, (layer, 0.0))

        carry, _ = jax.lax.scan(body, (x, cache), jnp.arange(c.depth))
        return carry


class _LayerMemoryKV(nn.Module):
    """One block's cross-attention keys and values of the memory (its `ca` parameters only)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, memory, _):
        return memory, CrossAttention(**_heads(self.config), name="ca").project_memory(memory)


class MemoryKV(nn.Module):
    """Every block's cross-attention keys and values of one batch of captions: memory [B, T, C] ->
    [depth, B, T', 2, H, hd] in the compute dtype.

    They depend on the text only, so generation projects them once instead of at every scale (a scale's blocks
    then read no cross-attention key/value weights). With cuDNN attention T' is T padded to cuDNN's tile, once
    here rather than in every block at every scale (the caption lengths mask the padding). Applied to the
    blocks' parameters (`params["blocks"]`), whose layout, scanned or one entry per block, it mirrors.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, memory):
        c = self.config
        memory = memory.astype(c.compute_dtype)
        if c.scan_blocks:
            scanned = nn.scan(_LayerMemoryKV, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.depth)
            kv = scanned(c, name="layers")(memory, None)[1]
        else:
            kv = jnp.stack([_LayerMemoryKV(c, name=f"block_{i}")(memory, None)[1] for i in range(c.depth)])
        if c.attention == "cudnn":
            kv = jnp.pad(kv, ((0, 0), (0, 0), (0, -kv.shape[2] % CUDNN_BLOCK), (0, 0), (0, 0), (0, 0)))
        return kv


class Infinity(nn.Module):
    """Infinity (text) or its class-conditional variant; see the module docstring for the data flow."""

    config: TransformerConfig

    def setup(self):
        c, std = self.config, self.config.init_std
        if c.cond == "text":
            self.cfg_uncond = self.param(
                "cfg_uncond",
                nn.with_logical_partitioning(_uncond_init, (None, "text_embed")),
                (c.text_maxlen, c.text_dim),
            )
            self.text_norm = RMSNorm("text_embed")
            self.text_pool = TextPool(c.embed_dim, std)
            self.text_fc1 = dense(c.embed_dim, ("text_embed", "embed"), std=std, name=None)
            self.text_fc2 = dense(c.embed_dim, ("embed", "embed_out"), std=std, name=None)
        else:
            self.class_emb = nn.Embed(
                c.num_classes + 1,
                c.embed_dim,
                embedding_init=nn.with_logical_partitioning(normal(std), (None, "embed")),
            )
        self.pos_start = self.param("pos_start", nn.with_logical_partitioning(normal(std), ("embed",)), (c.embed_dim,))
        self.lvl_embed = nn.Embed(
            c.num_levels, c.embed_dim, embedding_init=nn.with_logical_partitioning(normal(std), (None, "embed"))
        )
        if c.positions == "absolute":
            self.pos_1LC = self.param(
                "pos_1LC", nn.with_logical_partitioning(normal(std), (None, "embed")), (c.num_positions, c.embed_dim)
            )
        self.word_embed = dense(c.embed_dim, ("bits", "embed"), std=std, name=None)
        if c.shared_aln:
            self.shared_ada_lin = dense((6, c.embed_dim), ("embed", None, "embed_out"), std=std, name=None)
        self.blocks = BlockStack(c)
        self.head_nm = dense((2, c.embed_dim), ("embed", None, "embed_out"), std=std * ALN_INIT, name=None)
        if c.vocab:
            self.head = dense(c.vocab, ("embed", "vocab"), std=std * HEAD_INIT, name=None)
        else:
            self.head = dense((c.bits, 2), ("embed", "bits", None), std=std * HEAD_INIT, name=None)

    # -- conditioning ------------------------------------------------------------------------------------------

    def condition(self, text=None, text_mask=None, labels=None, drop=None) -> Condition:
        """Text [B, T, Ct5] + mask [B, T], or labels [B]; `drop` [B] bool swaps in the unconditional input."""
        c = self.config
        if c.cond == "text":
            if text is None or text_mask is None:
                raise ValueError("a text-conditional model needs text features and a text mask")
            if drop is not None:
                text = jnp.where(drop[:, None, None], self.unconditional_text(text.shape[1])[None], text)
            text = self.text_norm(text)
            cond = self.text_pool(text, text_mask)
            memory = self.text_fc2(nn.gelu(self.text_fc1(text), approximate=True))
        else:
            if labels is None:
                raise ValueError("a class-conditional model needs labels")
            if drop is not None:
                labels = jnp.where(drop, c.num_classes, labels)
            cond, memory = self.class_emb(labels), None
        cond = cond.astype(jnp.float32)
        adaln = self.shared_ada_lin(nn.silu(cond)) if c.shared_aln else cond
        lengths = None if memory is None else jnp.sum(text_mask, axis=-1, dtype=jnp.int32)
        return Condition(cond=cond, adaln=adaln, memory=memory, memory_lengths=lengths)

    def unconditional_text(self, length: int) -> jax.Array:
        """[length, Ct5]: the learned unconditional caption, cut to a caption's length (REFERENCE §3.3)."""
        return self.cfg_uncond[:length]

    # -- pieces of the sequence ----------------------------------------------------------------------------

    def sos(self, cond: jax.Array) -> jax.Array:
        """[B, C] -> [B, 1, C]: the first (1×1) scale's token."""
        return (cond + self.pos_start)[:, None]

    def embed(self, features: jax.Array) -> jax.Array:
        """[B, n, bits] next-scale input features -> [B, n, C]."""
        return self.word_embed(features.astype(jnp.float32))

    def logits(self, hidden: jax.Array, cond: jax.Array) -> jax.Array:
        """[B, n, C] -> [B, n, bits, 2] (bitwise) or [B, n, V] (codebook) float32; the head's AdaLN uses the
        pooled condition, not gss."""
        scale_shift = self.head_nm(nn.silu(cond))
        h = modulate(hidden, scale_shift[:, None, 0], scale_shift[:, None, 1])
        out = self.head(h)
        return constrain(out, "act_batch", "act_len", *(None,) * (out.ndim - 2))

    def _positions(self, schedule: Schedule, start: int, n: int):
        """(absolute position rows [n, C] or 0, RoPE (cos, sin) rows [n, hd/2] or None) of tokens start…start+n."""
        if self.config.positions == "absolute":
            return self.pos_1LC[start : start + n], None
        cos, sin = rope_table(schedule, self.config.head_dim)
        return 0.0, (jnp.asarray(cos[start : start + n]), jnp.asarray(sin[start : start + n]))

    # -- full sequence (training) ----------------------------------------------------------------------------

    def __call__(
        self, inputs, schedule: Schedule, text=None, text_mask=None, labels=None, drop=None, deterministic=True
    ):
        """Logits of every scale from ground-truth inputs, under the block-causal mask.

        Args:
          inputs: [B, L − 1, bits] next-scale input features of scales 2..K.
          schedule: the token schedule (static).
          text, text_mask / labels, drop: see `condition`.
          deterministic: False applies stochastic depth (needs a "dropout" rng).

        Returns:
          [B, L, bits, 2] (or [B, L, V] with a codebook head) float32 logits.
        """
        self.check_schedule(schedule)
        if inputs.ndim != 3 or inputs.shape[1:] != (schedule.num_tokens - 1, self.config.bits):
            raise ValueError(
                f"inputs must be [B, {schedule.num_tokens - 1}, {self.config.bits}] for schedule {schedule.name}, "
                f"got {tuple(inputs.shape)}"
            )
        condition = self.condition(text, text_mask, labels, drop)
        x = jnp.concatenate([self.sos(condition.cond), self.embed(inputs)], axis=1)
        positions, rope = self._positions(schedule, 0, schedule.num_tokens)
        x = x + self.lvl_embed(jnp.asarray(schedule.scale_ids()))[None] + positions
        ctx = BlockContext(condition, rope, schedule=schedule)
        x, _ = self.blocks(x, ctx, deterministic=deterministic)
        return self.logits(x, condition.cond)

    # -- one scale against a KV cache (generation) ----------------------------------------------------------

    def step(self, x, condition: Condition, schedule: Schedule, scale: int, cache, cfg_layer: int = -1, cfg=None):
        """Runs the tokens of scale `scale` ([B, n, C], embedded) through the blocks; returns (hidden, cache)."""
        start = schedule.offsets[scale]
        n = schedule.tokens_per_scale[scale]
        positions, rope = self._positions(schedule, start, n)
        x = x + self.lvl_embed(jnp.asarray(scale))[None, None] + positions
        return self.blocks(x, BlockContext(condition, rope, cfg=cfg), cache, start=start, cfg_layer=cfg_layer)

    def check_schedule(self, schedule: Schedule) -> None:
        if schedule.scales[0] != (1, 1):
            raise ValueError(
                f"schedule {schedule.name} must start with a 1x1 scale (the SOS token), got {schedule.scales[0]}"
            )
        if schedule.num_scales > self.config.num_levels:
            raise ValueError(
                f"schedule {schedule.name} has {schedule.num_scales} scales but the model has {self.config.num_levels} level embeddings"
            )
        if self.config.positions == "absolute" and schedule.num_tokens > self.config.num_positions:
            raise ValueError(
                f"schedule {schedule.name} has {schedule.num_tokens} tokens but the model's absolute position table "
                f"has {self.config.num_positions} rows"
            )


def _uncond_init(key, shape, dtype=jnp.float32):
    # N(0, 1.2²) truncated to ±2 (torch trunc_normal_ bounds are absolute), scaled by 1/√Ct5 (REFERENCE §3.8).
    return jax.random.truncated_normal(key, -2 / 1.2, 2 / 1.2, shape, dtype) * 1.2 / math.sqrt(shape[-1])


def init_cache(config: TransformerConfig, batch: int, schedule: Schedule, uninitialized: bool = False):
    """KV cache for one generation, in the compute dtype: zeros, or with `uninitialized` whatever the allocation
    holds (`jax.lax.empty`; zeros where the backend has no uninitialized buffers, e.g. on CPU).

    Scanned blocks: (k, v), each [depth, B, L, H, hd], one buffer that the scan carries. Unrolled blocks: one
    (k, v) per layer, each [B, L', H, hd] with L' the tokens rounded up to cuDNN's tile, so that cuDNN reads a
    layer's cache in place, bounded by key lengths (a prefix cut out of a stacked buffer is a copy per call).

    No reader sees a row before a scale has written it (`SelfAttention`), so the cache need not be zeroed: at 1024²
    the 2B model's caches are 5.2 GiB, whose zeroing took 3.3 ms of an H100's 0.27 s generation. Leave it off
    under a multi-device mesh, where XLA's partitioner has no rule for the uninitialized allocation.
    """
    rows = schedule.num_tokens if config.scan_blocks else -(-schedule.num_tokens // CUDNN_BLOCK) * CUDNN_BLOCK
    shape = (batch, rows, config.num_heads, config.head_dim)
    make = jax.lax.empty if uninitialized else jnp.zeros
    if config.scan_blocks:
        return tuple(make((config.depth, *shape), config.compute_dtype) for _ in range(2))
    return tuple(tuple(make(shape, config.compute_dtype) for _ in range(2)) for _ in range(config.depth))


def init_params(config: TransformerConfig, key: jax.Array, inputs: jax.Array, schedule: Schedule, **cond) -> dict:
    """`Infinity(config).init(key, inputs, schedule, **cond)["params"]`: logically partitioned (boxed) parameters.

    Unrolled blocks are drawn as the scanned twin's stacked layers and then cut apart. Initialising 32 unrolled
    blocks compiles every block's random draws of its own, and XLA fuses them into kernels that take minutes to
    compile for a GPU (the 2B layout: 134 s against 7 s scanned, for an H100 on a CPU host); the scan compiles one
    block's. The draws differ from a direct unrolled init's, the distribution does not.
    """
    if config.scan_blocks:
        return Infinity(config).init(key, inputs, schedule, **cond)["params"]
    twin = dataclasses.replace(config, scan_blocks=True, remat_free=0)
    params = Infinity(twin).init(key, inputs, schedule, **cond)["params"]
    stacked = params["blocks"]["layers"]

    def layer(leaf, i):
        if _boxed(leaf):  # the scan's leading "layers" axis goes with the layer
            return leaf.replace_boxed(leaf.value[i]).replace(names=leaf.names[1:])
        return leaf[i]

    blocks = {
        f"block_{i}": jax.tree.map(lambda leaf, i=i: layer(leaf, i), stacked, is_leaf=_boxed)
        for i in range(config.depth)
    }
    return {**params, "blocks": blocks}


def _boxed(leaf) -> bool:
    return isinstance(leaf, nn.LogicallyPartitioned)
