"""Official Infinity state dicts (REFERENCE §6.2–6.3) -> `models.transformer.Infinity` parameters.

torch Linear weights [out, in] become kernels [in, out] reshaped to our head-split layout (e.g. mat_qkv
[3C, C] -> qkv [C, 3, H, hd]); biases and per-head vectors are reshaped the same way. Blocks may be stored as
`blocks.{i}` or `block_chunks.{c}.module.{j}` (i = c·depth/chunks + j); the per-head attention scale as
`[1, H, 1, 1]` or the flash layout `[1, 1, H, 1]` (official issue #117). The constant `zero_k_bias` buffers are
skipped; every other name must match, or conversion fails listing all differences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import Rule, apply_rules, load_torch_state_dict
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.schedules import Schedule

_BUFFER = re.compile(r"(^|\.)zero_k_bias$")
_TOP = {  # our path -> (official name, input dims of the kernel or 0 for a reshape)
    ("cfg_uncond",): ("cfg_uncond", 0),
    ("pos_start",): ("pos_start", 0),
    ("text_norm", "scale"): ("text_norm.weight", 0),
    ("text_pool", "query"): ("text_proj_for_sos.ca.mat_q", 0),
    ("text_pool", "v_bias"): ("text_proj_for_sos.ca.v_bias", 0),
    ("text_pool", "kv", "kernel"): ("text_proj_for_sos.ca.mat_kv.weight", 1),
    ("text_pool", "proj", "kernel"): ("text_proj_for_sos.ca.proj.weight", 2),
    ("text_pool", "proj", "bias"): ("text_proj_for_sos.ca.proj.bias", 0),
    ("text_fc1", "kernel"): ("text_proj_for_ca.0.weight", 1),
    ("text_fc1", "bias"): ("text_proj_for_ca.0.bias", 0),
    ("text_fc2", "kernel"): ("text_proj_for_ca.2.weight", 1),
    ("text_fc2", "bias"): ("text_proj_for_ca.2.bias", 0),
    ("class_emb", "embedding"): ("class_emb.weight", 0),
    ("lvl_embed", "embedding"): ("lvl_embed.weight", 0),
    ("word_embed", "kernel"): ("word_embed.weight", 1),
    ("word_embed", "bias"): ("word_embed.bias", 0),
    ("shared_ada_lin", "kernel"): ("shared_ada_lin.1.weight", 1),
    ("shared_ada_lin", "bias"): ("shared_ada_lin.1.bias", 0),
    ("head_nm", "kernel"): ("head_nm.ada_lin.1.weight", 1),
    ("head_nm", "bias"): ("head_nm.ada_lin.1.bias", 0),
    ("head", "kernel"): ("head.weight", 1),
    ("head", "bias"): ("head.bias", 0),
}
_BLOCK = {  # path inside a block -> (official name inside the block, input dims)
    ("ada_gss",): ("ada_gss", 0),
    ("ada_lin", "kernel"): ("ada_lin.1.weight", 1),
    ("ada_lin", "bias"): ("ada_lin.1.bias", 0),
    ("sa", "scale_mul"): ("sa.scale_mul_1H11", 0),
    ("sa", "q_bias"): ("sa.q_bias", 0),
    ("sa", "v_bias"): ("sa.v_bias", 0),
    ("sa", "qkv", "kernel"): ("sa.mat_qkv.weight", 1),
    ("sa", "proj", "kernel"): ("sa.proj.weight", 2),
    ("sa", "proj", "bias"): ("sa.proj.bias", 0),
    ("ca", "v_bias"): ("ca.v_bias", 0),
    ("ca", "q", "kernel"): ("ca.mat_q.weight", 1),
    ("ca", "q", "bias"): ("ca.mat_q.bias", 0),
    ("ca", "kv", "kernel"): ("ca.mat_kv.weight", 1),
    ("ca", "proj", "kernel"): ("ca.proj.weight", 2),
    ("ca", "proj", "bias"): ("ca.proj.bias", 0),
    ("ca_norm", "scale"): ("ca_norm.weight", 0),
    ("ca_norm", "bias"): ("ca_norm.bias", 0),
    ("ffn", "fc1", "kernel"): ("ffn.fc1.weight", 1),
    ("ffn", "fc1", "bias"): ("ffn.fc1.bias", 0),
    ("ffn", "fc2", "kernel"): ("ffn.fc2.weight", 1),
    ("ffn", "fc2", "bias"): ("ffn.fc2.bias", 0),
}


def official_shapes(name: str, shape: tuple[int, ...], in_dims: int) -> list[tuple[int, ...]]:
    """The torch shape(s) under which the official code stores a parameter of ours of `shape`.

    A Linear weight is [prod(out dims), prod(in dims)]; biases and per-head vectors are flat; a few leaves keep
    singleton axes; the attention scale has two layouts.
    """
    leaf = name.rsplit(".", 1)[-1]
    if in_dims:
        return [(math.prod(shape[in_dims:]), math.prod(shape[:in_dims]))]
    if leaf == "scale_mul_1H11":
        return [(1, shape[0], 1, 1), (1, 1, shape[0], 1)]
    extra = {"pos_start": (1, 1), "mat_q": (1,), "ada_gss": (1, 1)}.get(leaf)
    if extra is not None:
        return [(*extra, *shape)]
    if leaf in ("bias", "q_bias", "v_bias"):
        return [(math.prod(shape),)]
    return [shape]


def _transform(name: str, shape: tuple[int, ...], in_dims: int):
    accepted = official_shapes(name, shape, in_dims)

    def transform(value: np.ndarray) -> np.ndarray:
        if tuple(value.shape) not in accepted:
            return value  # left as is, so that the mismatch is reported with both shapes
        return (value.T if in_dims else value).reshape(shape)

    return transform


def abstract_params(config: TransformerConfig):
    """The model's parameter shapes, unscanned (block_0 … block_{depth−1})."""
    loop = Infinity(TransformerConfig(**{**config.__dict__, "scan_blocks": False, "remat": "none"}))
    schedule = Schedule(((1, 1),))
    args = dict(text=jnp.zeros((1, 1, config.text_dim)), text_mask=jnp.ones((1, 1), bool)) if config.cond == "text" else dict(labels=jnp.zeros((1,), jnp.int32))  # fmt: skip
    return nn.unbox(
        jax.eval_shape(lambda: loop.init(jax.random.key(0), jnp.zeros((1, 0, config.bits)), schedule, **args))["params"]
    )


def _block_prefixes(state_dict: Mapping[str, object], depth: int) -> list[tuple[str, ...]]:
    """Official name prefixes of block i, for the block layout(s) found in the state dict."""
    chunk_ids = {int(m.group(1)) for name in state_dict if (m := re.match(r"block_chunks\.(\d+)\.module\.", name))}
    chunks = len(chunk_ids)
    prefixes = []
    for i in range(depth):
        candidates = [f"blocks.{i}."]
        if chunks and depth % chunks == 0:
            per_chunk = depth // chunks
            candidates.append(f"block_chunks.{i // per_chunk}.module.{i % per_chunk}.")
        prefixes.append(tuple(candidates))
    return prefixes


def _names(target: tuple[str, ...]) -> tuple[str, int]:
    """(official name, or name inside a block; kernel input dims) of one of our parameter paths."""
    return _BLOCK[target[2:]] if target[0] == "blocks" else _TOP[target]


def _rules(abstract, prefixes) -> list[Rule]:
    rules = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        target = tuple(k.key for k in path)
        name, in_dims = _names(target)
        if target[0] == "blocks":
            sources = tuple(p + name for p in prefixes[int(target[1].removeprefix("block_"))])
        else:
            sources = (name,)
        rules.append(Rule(target, sources, _transform(name, tuple(leaf.shape), in_dims)))
    return rules


def convert_state_dict(state_dict: Mapping[str, object], config: TransformerConfig):
    """Official state dict -> our params (float32), stacked under "layers" if `config.scan_blocks`.

    Raises CheckpointMismatchError listing every missing, unexpected and misshapen entry.
    """
    abstract = abstract_params(config)
    rules = _rules(abstract, _block_prefixes(state_dict, config.depth))
    params = apply_rules(state_dict, rules, abstract, ignore=lambda name: bool(_BUFFER.search(name)))
    return stack_blocks(params, config.depth) if config.scan_blocks else params


def official_layout(config: TransformerConfig, block_chunks: int = 1) -> dict[str, tuple[int, ...]]:
    """The official parameter names and torch shapes our model expects (buffers excluded)."""
    per_chunk = config.depth // block_chunks
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]:
        target = tuple(k.key for k in path)
        name, in_dims = _names(target)
        if target[0] == "blocks":
            i = int(target[1].removeprefix("block_"))
            name = (
                f"block_chunks.{i // per_chunk}.module.{i % per_chunk}." if block_chunks > 1 else f"blocks.{i}."
            ) + name
        layout[name] = official_shapes(name, tuple(leaf.shape), in_dims)[0]
    return layout


def stack_blocks(params, depth: int):
    """Loop layout (blocks/block_i) -> scan layout (blocks/layers, stacked on a leading axis)."""
    blocks = [params["blocks"][f"block_{i}"] for i in range(depth)]
    return {**params, "blocks": {"layers": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks)}}


def unstack_blocks(params, depth: int):
    """Scan layout -> loop layout."""
    layers = params["blocks"]["layers"]
    return {**params, "blocks": {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(depth)}}


def load_official(path: str, config: TransformerConfig):
    """Reads `infinity_*.pth` (a plain state dict or a training checkpoint {"trainer": {"gpt_fsdp": …}})."""
    return convert_state_dict(load_torch_state_dict(path, containers=("trainer", "gpt_fsdp")), config)
