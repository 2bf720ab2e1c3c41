"""Converted checkpoints: the orbax params checkpoint `python -m infinity_jax.convert` writes, and its layout.

A converted checkpoint is a params-only checkpoint (`train.checkpoint.save_params`: `params/` + `config.json`)
whose config.json says what it holds:

    {"kind": "transformer" | "tokenizer" | "t5" | "vqvae", "layout": {the layout dataclass's fields},
     "resolution": VAR's schedule (transformers with absolute positions), "source": the converted file,
     "dtype": "float32" | "bfloat16"}

so that `load` rebuilds the layout and the parameters without any other input, and the trainer
(`train.init_from`, `tokenizer.checkpoint`, `text.checkpoint`) reads the same folder. Transformer parameters may
be stored with scanned ("layers") or looped ("block_i") blocks; `relayout` converts between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from infinity_jax.convert.common import read_state_dict
from infinity_jax.models.bsq_vae import TokenizerConfig
from infinity_jax.models.t5 import T5Config
from infinity_jax.models.transformer import TransformerConfig
from infinity_jax.models.vqvae import VQVAEConfig
from infinity_jax.schedules import Schedule, var_schedule
from infinity_jax.train import checkpoint

KINDS = ("transformer", "tokenizer", "t5", "vqvae")


class Converted(NamedTuple):
    kind: str
    layout: Any  # TransformerConfig, TokenizerConfig, T5Config or VQVAEConfig
    params: Any
    schedule: Schedule | None  # VAR transformers: the schedule of their absolute positions


def _layout_from_dict(kind: str, fields: dict):
    if kind == "transformer":
        return TransformerConfig(**fields)
    if kind == "tokenizer":
        return TokenizerConfig(**{**fields, "ch_mult": tuple(fields["ch_mult"])})
    if kind == "t5":
        return T5Config(**fields)
    layout = fields.pop("layout")
    return VQVAEConfig(TokenizerConfig(**{**layout, "ch_mult": tuple(layout["ch_mult"])}), **fields)


def save(path: str, kind: str, layout, params, *, source: str = "", dtype: str = "float32", resolution=None) -> str:
    """Writes params (cast to `dtype`) and the layout as a converted checkpoint. Returns the path."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    meta = {"kind": kind, "layout": dataclasses.asdict(layout), "source": source, "dtype": dtype}
    if resolution is not None:
        meta["resolution"] = resolution
    return checkpoint.save_params(path, params, meta)


def read_meta(path: str) -> dict:
    """The config.json of a converted checkpoint (raises ValueError for other folders)."""
    meta_path = os.path.join(path, "config.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} has no config.json: not a converted checkpoint")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{path} is not a converted checkpoint (its config.json has no kind in {KINDS})")
    return meta


def layout_of(path: str):
    """(kind, layout, VAR schedule or None) of a converted checkpoint, without reading its parameters."""
    meta = read_meta(path)
    layout = _layout_from_dict(meta["kind"], dict(meta["layout"]))
    schedule = var_schedule(meta["resolution"]) if meta.get("resolution") is not None else None
    return meta["kind"], layout, schedule


def load(path: str) -> Converted:
    """The layout and the parameters (as saved: dtype and block layout) of a converted checkpoint."""
    kind, layout, schedule = layout_of(path)
    return Converted(kind, layout, checkpoint.load_params(path, None), schedule)


def relayout(params, scan_blocks: bool, depth: int):
    """Transformer params with either block layout -> `scan_blocks`' layout ("layers" stacked, or block_i)."""
    from infinity_jax.convert.transformer import stack_blocks, unstack_blocks

    scanned = "layers" in params["blocks"]
    if scanned == scan_blocks:
        return params
    return stack_blocks(params, depth) if scan_blocks else unstack_blocks(params, depth)


_LAYOUT_FIELDS = ("depth", "embed_dim", "num_heads", "ffn_dim", "bits", "cond", "shared_aln", "text_dim",
                  "text_maxlen", "num_classes", "num_levels", "positions", "num_positions", "vocab")  # fmt: skip


def load_transformer(path: str, config: TransformerConfig, abstract):
    """Transformer params for `config` placed as `abstract` (ShapeDtypeStructs with shardings), from a converted
    checkpoint (either block layout), a params checkpoint of a run, or an official file/folder (converted now).

    A converted checkpoint of another layout fails naming every differing field.
    """
    from infinity_jax.convert import transformer as convert_transformer

    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    if not os.path.isdir(os.path.join(path, "params")):
        state = read_state_dict(path, containers=("trainer", "gpt_fsdp"))
        return jax.device_put(convert_transformer.convert_state_dict(state, config), shardings)
    try:
        kind, saved, _ = layout_of(path)
    except (FileNotFoundError, ValueError):  # a run's params export: its tree must match as it is
        return checkpoint.load_params(path, abstract)
    if kind != "transformer":
        raise ValueError(f"{path} holds a converted {kind}, not a transformer")
    differing = [f"{f}: checkpoint {getattr(saved, f)!r}, config {getattr(config, f)!r}" for f in _LAYOUT_FIELDS
                 if getattr(saved, f) != getattr(config, f)]  # fmt: skip
    if differing:
        raise ValueError(f"{path} does not fit the configured model: " + "; ".join(differing))
    if saved.scan_blocks == config.scan_blocks:
        return checkpoint.load_params(path, abstract)
    params = relayout(checkpoint.load_params(path, None), config.scan_blocks, config.depth)
    return jax.device_put(jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract), shardings)


def random_params(kind: str, name: str, seed: int = 0, overrides: dict | None = None, resolution=256):
    """(layout, params) of random weights of a named layout ("transformer", "tokenizer", "vqvae" or "t5"; the
    layouts' own init). `resolution`: VAR transformers' image size or patch_nums."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from infinity_jax.models.bsq_vae import get_tokenizer_config
    from infinity_jax.models.t5 import T5Encoder, get_t5_layout
    from infinity_jax.models.transformer import Infinity, TransformerConfig
    from infinity_jax.models.vqvae import VQVAES, VQTokenizer
    from infinity_jax.tokenizer import Tokenizer

    key = jax.random.key(seed)
    if kind == "transformer":
        schedule = var_schedule(resolution) if name.startswith("var") else None
        config = TransformerConfig.from_size(name, schedule=schedule, **(overrides or {}))
        cond = {"labels": jnp.zeros((1,), jnp.int32)} if config.cond == "class" else {
            "text": jnp.zeros((1, 1, config.text_dim)), "text_mask": jnp.ones((1, 1), bool)}  # fmt: skip
        init = lambda k: Infinity(config).init(k, jnp.zeros((1, 0, config.bits)), Schedule(((1, 1),)), **cond)  # noqa: E731
        return config, nn.unbox(jax.jit(init)(key)["params"])
    if kind in ("tokenizer", "vqvae"):
        cls, layout = (Tokenizer, get_tokenizer_config(name)) if kind == "tokenizer" else (VQTokenizer, VQVAES[name])
        made = jax.jit(functools.partial(cls.init, layout))(key)
        return made.config, made.params
    if kind == "t5":
        config = get_t5_layout(name)
        tokens = jnp.zeros((1, 2), jnp.int32)
        return config, nn.unbox(jax.jit(lambda k: T5Encoder(config).init(k, tokens, tokens > 0)["params"])(key))
    raise ValueError(f"random weights are for transformer, tokenizer, vqvae or t5 layouts, not {kind!r}")
