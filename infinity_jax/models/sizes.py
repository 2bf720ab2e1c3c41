"""The one table of transformer layouts: Infinity (REFERENCE §3.1), its layerN scaling family, VAR d16–d36 (§9).

A scaling team names a size; every dimension follows from this table. `count_params` is the analytic parameter
count of the official layout (it reproduces the instantiated Infinity-2B exactly), used to check the table and,
once the model is built, the model.
"""

from __future__ import annotations

import dataclasses

TEXT_DIM = 2048  # flan-t5-xl width
TEXT_MAXLEN = 512
NUM_LEVEL_EMBEDDINGS = 15  # Infinity's lvl_embed rows (>= 13 scales)
VAR_CODEBOOK_SIZE = 4096
VAR_VAE_DIM = 32


def infinity_ffn_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """round(C·4/256)·256 with Python's round-half-to-even, as the official code (2080·4/256 = 32.5 -> 32)."""
    return round(embed_dim * mlp_ratio / 256) * 256


@dataclasses.dataclass(frozen=True)
class TransformerSize:
    """One layout.

    family: "infinity" (text-conditional, cross-attention, 2D RoPE) or "var" (class-conditional, absolute
      positions, no cross-attention).
    block_chunks: how official checkpoints group blocks (`block_chunks.{c}.module.{j}`); 1 means `blocks.{i}`.
    shared_aln: one AdaLN projection for all blocks plus a per-block bias (all Infinity sizes, VAR d36-s).
    """

    family: str
    depth: int
    embed_dim: int
    num_heads: int
    ffn_dim: int
    drop_path: float
    block_chunks: int = 1
    shared_aln: bool = True

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def _infinity(depth, embed_dim, num_heads, drop_path=0.1, block_chunks=4):
    return TransformerSize(
        "infinity", depth, embed_dim, num_heads, infinity_ffn_dim(embed_dim), drop_path, block_chunks
    )


def _var(depth, shared_aln=False):
    # build_vae_var: width 64·depth, heads = depth, drop path 0.1·depth/24, FFN 4·C (not rounded).
    c = 64 * depth
    return TransformerSize("var", depth, c, depth, 4 * c, 0.1 * depth / 24, 1, shared_aln)


SIZES: dict[str, TransformerSize] = {
    "tiny": TransformerSize("infinity", 2, 64, 2, infinity_ffn_dim(64), 0.0, 2),
    "infinity_layer12": _infinity(12, 768, 8),
    "infinity_layer16": _infinity(16, 1152, 12),
    "infinity_layer24": _infinity(24, 1536, 16),
    "infinity_layer32": _infinity(32, 2080, 20),
    "infinity_layer40": _infinity(40, 2688, 24),
    "infinity_layer48": _infinity(48, 3360, 28),
    "infinity_2b": _infinity(32, 2048, 16, block_chunks=8),
    "infinity_8b": _infinity(40, 3584, 28, block_chunks=8),
    "infinity_20b": _infinity(58, 4608, 36, drop_path=0.25, block_chunks=1),
    "var_tiny": TransformerSize("var", 2, 64, 2, 256, 0.0, 1, False),
    "var_d16": _var(16),
    "var_d20": _var(20),
    "var_d24": _var(24),
    "var_d30": _var(30),
    "var_d36": _var(36, shared_aln=True),
}

# Names used by the official CLI (`--model=2bc8`) and the paper's figure labels.
ALIASES = {
    "layer12c4": "infinity_layer12",
    "125m": "infinity_layer12",
    "layer16": "infinity_layer16",
    "361m": "infinity_layer16",
    "layer24c4": "infinity_layer24",
    "1b": "infinity_layer24",
    "2bc8": "infinity_2b",
    "2b": "infinity_2b",
    "8b": "infinity_8b",
    "20b": "infinity_20b",
    "d16": "var_d16",
    "d20": "var_d20",
    "d24": "var_d24",
    "d30": "var_d30",
    "d36": "var_d36",
}


def depth_rule(depth: int) -> TransformerSize:
    """The small-model family of scaling sweeps ("depthN"): VAR's width rule (C = 64·depth, one 64-wide head per
    64 channels) with Infinity's blocks (text or class conditioning, 2D RoPE, shared AdaLN) and no stochastic
    depth, so that one number spans sizes from 0.3M parameters (depth 2) upwards."""
    if depth < 1:
        raise ValueError(f"depthN needs N >= 1, got {depth}")
    c = 64 * depth
    return TransformerSize("infinity", depth, c, depth, infinity_ffn_dim(c), 0.0, 1)


def get_size(name: str) -> TransformerSize:
    """A layout by name or alias (case-insensitive), or "depthN" (`depth_rule`); ValueError listing the valid names
    otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key.startswith("depth") and key[5:].isdigit():
        return depth_rule(int(key[5:]))
    if key not in SIZES:
        raise ValueError(
            f"unknown model size {name!r}; valid sizes: {', '.join(SIZES)}, depthN (the scaling rule); "
            f"aliases: {', '.join(sorted(ALIASES))}"
        )
    return SIZES[key]


def canonical_name(name: str) -> str:
    """The table key of a size name or alias."""
    get_size(name)
    return ALIASES.get(name.lower(), name.lower())


def count_params(
    size: TransformerSize,
    bits: int = 32,
    text_dim: int = TEXT_DIM,
    text_maxlen: int = TEXT_MAXLEN,
    num_tokens: int = 680,
    num_scales: int = 10,
) -> int:
    """Trainable parameters of the official layout (buffers such as zero_k_bias excluded).

    Args:
      size: the layout.
      bits: Infinity's d (tokens in and 2·d logits out); 56 for the patchified 8B model.
      text_dim, text_maxlen: T5 width and the length of the learned unconditional text (`cfg_uncond`).
      num_tokens, num_scales: VAR only: L of its absolute position table and the level-embedding rows.
    """
    c, f, depth = size.embed_dim, size.ffn_dim, size.depth

    def linear(n_in, n_out, bias=True):
        return n_in * n_out + (n_out if bias else 0)

    attention = size.num_heads + 2 * c + linear(c, 3 * c, bias=False) + linear(c, c)  # scale_mul, q/v bias
    ffn = linear(c, f) + linear(f, c)
    adaln = 6 * c if size.shared_aln else linear(c, 6 * c)  # per-block ada_gss, or per-block ada_lin
    head = linear(c, 2 * c)  # head_nm.ada_lin
    if size.family == "var":
        block = attention + ffn + adaln
        top = linear(VAR_VAE_DIM, c) + (1000 + 1) * c + c + num_tokens * c + num_scales * c
        top += linear(c, 6 * c) if size.shared_aln else 0
        return top + depth * block + head + linear(c, VAR_CODEBOOK_SIZE)
    cross = c + linear(c, c) + linear(c, 2 * c, bias=False) + linear(c, c)  # v_bias, q, kv, proj
    block = attention + cross + ffn + adaln + 2 * c  # + ca_norm
    text = text_maxlen * text_dim + text_dim  # cfg_uncond, text_norm
    pool = c + c + linear(text_dim, 2 * c, bias=False) + linear(c, c)  # mat_q, v_bias, mat_kv, proj
    text_proj = linear(text_dim, c) + linear(c, c)
    top = text + pool + text_proj + c + NUM_LEVEL_EMBEDDINGS * c + linear(bits, c) + linear(c, 6 * c)
    return top + depth * block + head + linear(c, 2 * bits)
