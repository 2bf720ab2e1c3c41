"""Official Infinity (REFERENCE §6.2–6.3) and VAR (§9) transformer state dicts <-> `models.transformer.Infinity`
parameters.

torch Linear weights [out, in] become kernels [in, out] reshaped to our head-split layout (e.g. mat_qkv
[3C, C] -> qkv [C, 3, H, hd]); biases and per-head vectors are reshaped the same way. Blocks may be stored as
`blocks.{i}` or `block_chunks.{c}.module.{j}` (i = c·depth/chunks + j); the per-head attention scale as
`[1, H, 1, 1]` or the flash layout `[1, 1, H, 1]` (official issue #117). The constant buffers (`zero_k_bias`;
VAR's `lvl_1L` and `attn_bias_for_masking`) are skipped; every other name must match, or conversion fails listing
all differences. VAR names its self-attention `attn` (Infinity: `sa`) and adds the absolute table `pos_1LC`.

`export_state_dict` writes our parameters back under the official names, buffers included, so that the official
code loads them with `strict=True`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import Rule, apply_rules, export_rules, leaf_paths, read_state_dict
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.schedules import Schedule

_BUFFER = re.compile(r"((^|\.)zero_k_bias|^lvl_1L|^attn_bias_for_masking)$")
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
    ("pos_1LC",): ("pos_1LC", 0),
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
    extra = {"pos_start": (1, 1), "pos_1LC": (1,), "mat_q": (1,), "ada_gss": (1, 1)}.get(leaf)
    if extra is not None:
        return [(*extra, *shape)]
    if leaf in ("bias", "q_bias", "v_bias"):
        return [(math.prod(shape),)]
    return [shape]


def _transforms(name: str, shape: tuple[int, ...], in_dims: int):
    """(official tensor -> our leaf, our leaf -> official tensor)."""
    accepted = official_shapes(name, shape, in_dims)

    def transform(value: np.ndarray) -> np.ndarray:
        if tuple(value.shape) not in accepted:
            return value  # left as is, so that the mismatch is reported with both shapes
        return (value.T if in_dims else value).reshape(shape)

    def inverse(value: np.ndarray) -> np.ndarray:
        if in_dims:
            return value.reshape(accepted[0][::-1]).T
        return value.reshape(accepted[0])

    return transform, inverse


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


def _names(target: tuple[str, ...], config: TransformerConfig) -> tuple[str, int]:
    """(official name, or name inside a block; kernel input dims) of one of our parameter paths."""
    if target[0] != "blocks":
        return _TOP[target]
    name, in_dims = _BLOCK[target[2:]]
    if config.vocab and name.startswith("sa."):  # VAR's self-attention is `attn`
        name = "attn." + name.removeprefix("sa.")
    return name, in_dims


def _chunked(i: int, depth: int, block_chunks: int) -> str:
    per_chunk = depth // block_chunks
    return f"block_chunks.{i // per_chunk}.module.{i % per_chunk}." if block_chunks > 1 else f"blocks.{i}."


def _rules(config: TransformerConfig, abstract, prefixes) -> list[Rule]:
    rules = []
    for target, leaf in leaf_paths(abstract):
        name, in_dims = _names(target, config)
        if target[0] == "blocks":
            sources = tuple(p + name for p in prefixes[int(target[1].removeprefix("block_"))])
        else:
            sources = (name,)
        rules.append(Rule(target, sources, *_transforms(name, tuple(leaf.shape), in_dims)))
    return rules


def convert_state_dict(state_dict: Mapping[str, object], config: TransformerConfig):
    """Official state dict -> our params (float32), stacked under "layers" if `config.scan_blocks`.

    Raises CheckpointMismatchError listing every missing, unexpected and misshapen entry.
    """
    abstract = abstract_params(config)
    rules = _rules(config, abstract, _block_prefixes(state_dict, config.depth))
    params = apply_rules(state_dict, rules, abstract, ignore=lambda name: bool(_BUFFER.search(name)))
    return stack_blocks(params, config.depth) if config.scan_blocks else params


def official_layout(config: TransformerConfig, block_chunks: int = 1) -> dict[str, tuple[int, ...]]:
    """The official parameter names and torch shapes our model expects (buffers excluded)."""
    layout = {}
    for target, leaf in leaf_paths(abstract_params(config)):
        name, in_dims = _names(target, config)
        if target[0] == "blocks":
            name = _chunked(int(target[1].removeprefix("block_")), config.depth, block_chunks) + name
        layout[name] = official_shapes(name, tuple(leaf.shape), in_dims)[0]
    return layout


def _buffers(config: TransformerConfig, schedule: Schedule | None, block_chunks: int) -> dict[str, np.ndarray]:
    """The official model's constant buffers: zero key biases; for VAR also the level ids and the block-causal
    additive mask of its schedule."""
    out = {
        _chunked(i, config.depth, block_chunks) + ("attn" if config.vocab else "sa") + ".zero_k_bias": np.zeros(
            config.embed_dim, np.float32
        )
        for i in range(config.depth)
    }
    if config.vocab:
        ids = schedule.scale_ids()
        out["lvl_1L"] = ids[None].astype(np.int64)
        mask = np.where(ids[:, None] >= ids[None, :], 0.0, -np.inf).astype(np.float32)
        out["attn_bias_for_masking"] = mask[None, None]
    if config.cond == "text":
        out |= {f"{p}.zero_k_bias": np.zeros(config.embed_dim, np.float32) for p in ("text_proj_for_sos.ca",)}
        out |= {
            _chunked(i, config.depth, block_chunks) + "ca.zero_k_bias": np.zeros(config.embed_dim, np.float32)
            for i in range(config.depth)
        }
    return out


def export_state_dict(
    params, config: TransformerConfig, block_chunks: int = 1, schedule: Schedule | None = None
) -> dict[str, np.ndarray]:
    """Our params (loop or scan layout) -> the official state dict (float32 numpy, buffers included).

    block_chunks: 1 writes `blocks.{i}`, n > 1 `block_chunks.{c}.module.{j}` (the released 2B/8B layout).
    schedule: VAR only, the schedule of its position table (for the mask buffers).
    """
    if "layers" in params["blocks"]:
        params = unstack_blocks(params, config.depth)
    if config.vocab and (schedule is None or schedule.num_tokens != config.num_positions):
        raise ValueError(f"exporting VAR needs the schedule of its {config.num_positions} positions")
    abstract = abstract_params(config)
    prefixes = [(_chunked(i, config.depth, block_chunks),) for i in range(config.depth)]
    return {**export_rules(params, _rules(config, abstract, prefixes)), **_buffers(config, schedule, block_chunks)}


def stack_blocks(params, depth: int):
    """Loop layout (blocks/block_i) -> scan layout (blocks/layers, stacked on a leading axis)."""
    blocks = [params["blocks"][f"block_{i}"] for i in range(depth)]
    return {**params, "blocks": {"layers": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks)}}


def unstack_blocks(params, depth: int):
    """Scan layout -> loop layout."""
    layers = params["blocks"]["layers"]
    return {**params, "blocks": {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(depth)}}


def load_official(path: str, config: TransformerConfig):
    """Reads `infinity_*.pth` / `var_d*.pth` (a plain state dict, a training checkpoint {"trainer": {"gpt_fsdp":
    …}}, a `.safetensors`, or a folder of shards such as the 8B's)."""
    return convert_state_dict(read_state_dict(path, containers=("trainer", "gpt_fsdp")), config)


def _block_indices(state_dict: Mapping[str, object]) -> list[str]:
    """The official prefix of every block found, in block order (`blocks.{i}.` or `block_chunks.{c}.module.{j}.`)."""
    flat = sorted({int(m.group(1)) for n in state_dict if (m := re.match(r"blocks\.(\d+)\.", n))})
    chunked = sorted(
        {
            (int(m.group(1)), int(m.group(2)))
            for n in state_dict
            if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", n))
        }
    )
    if flat and chunked:
        raise ValueError("the state dict mixes `blocks.{i}` and `block_chunks.{c}.module.{j}` names")
    if flat:
        return [f"blocks.{i}." for i in flat]
    return [f"block_chunks.{c}.module.{j}." for c, j in chunked]


def infer_config(state_dict: Mapping[str, object], **overrides) -> TransformerConfig:
    """The layout an official Infinity or VAR state dict holds, read off its names and shapes.

    Text-conditional Infinity has `cfg_uncond`, VAR has `pos_1LC` (absolute positions) and a codebook head.
    Training-only fields (drop_path) come from the size table when a size matches; `overrides` set any field.
    """
    from infinity_jax.models import sizes

    def shape(name):
        if name not in state_dict:
            raise ValueError(f"not an Infinity/VAR transformer state dict: no {name!r}")
        return tuple(state_dict[name].shape)

    prefixes = _block_indices(state_dict)
    if not prefixes:
        raise ValueError("not an Infinity/VAR transformer state dict: no blocks")
    first = prefixes[0]
    var = "pos_1LC" in state_dict
    attn = first + ("attn." if var else "sa.")
    embed_dim, bits = shape("word_embed.weight")
    fields = dict(
        depth=len(prefixes),
        embed_dim=embed_dim,
        num_heads=math.prod(shape(attn + "scale_mul_1H11")),
        ffn_dim=shape(first + "ffn.fc1.weight")[0],
        bits=bits,
        shared_aln="shared_ada_lin.1.weight" in state_dict,
        num_levels=shape("lvl_embed.weight")[0],
    )
    if "cfg_uncond" in state_dict:
        fields.update(cond="text", text_maxlen=shape("cfg_uncond")[0], text_dim=shape("cfg_uncond")[1])
    else:
        fields.update(cond="class", num_classes=shape("class_emb.weight")[0] - 1)
    if var:
        fields.update(positions="absolute", num_positions=shape("pos_1LC")[1], vocab=shape("head.weight")[0])
    family = "var" if var else "infinity"
    for size in sizes.SIZES.values():
        if (size.family, size.depth, size.embed_dim) == (family, fields["depth"], embed_dim):
            fields["drop_path"] = size.drop_path
            break
    return TransformerConfig(**{**fields, **overrides})


def var_resolution(state_dict: Mapping[str, object], config: TransformerConfig) -> int | tuple[int, ...]:
    """VAR's schedule for a state dict: the image size whose schedule has the config's absolute positions, or the
    patch_nums its `lvl_1L` buffer (every token's scale) spells out."""
    from infinity_jax.schedules import VAR_PATCH_NUMS, var_schedule

    if "lvl_1L" in state_dict:
        counts = np.bincount(np.asarray(state_dict["lvl_1L"]).reshape(-1))
        patch_nums = tuple(round(math.sqrt(c)) for c in counts)
        if [p * p for p in patch_nums] != counts.tolist() or sum(counts) != config.num_positions:
            raise ValueError(f"lvl_1L does not describe square scales of {config.num_positions} tokens: {counts}")
        named = [r for r, p in VAR_PATCH_NUMS.items() if p == patch_nums]
        return named[0] if named else patch_nums
    for resolution in VAR_PATCH_NUMS:
        if var_schedule(resolution).num_tokens == config.num_positions:
            return resolution
    raise ValueError(
        f"no VAR schedule has {config.num_positions} tokens (known: {sorted(VAR_PATCH_NUMS)}) and the file has no lvl_1L"
    )
