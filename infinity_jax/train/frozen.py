"""The frozen towers of transformer training: the BSQ-VAE tokenizer and the T5 text encoder.

Each loads from "random" (untrained weights, for tests and smoke runs), a params-only checkpoint folder, or the
released files (an official tokenizer `.pth`; a Hugging Face T5 folder), and is placed on the mesh by its own
logical-axis rules (by default replicated weights, batch-sharded activations). Neither is in the optimizer state.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections

from infinity_jax import config as config_lib
from infinity_jax import sharding
from infinity_jax.convert import tokenizer as convert_tokenizer
from infinity_jax.models.t5 import T5Encoder, get_t5_layout
from infinity_jax.tokenizer import Tokenizer
from infinity_jax.train import checkpoint
from infinity_jax.train.step import Frozen


def _tokenizer_init(config: ml_collections.ConfigDict):
    """(layout, init: key -> boxed params) of the configured tokenizer."""
    layout = config_lib.tokenizer_layout(config.tokenizer)
    module = Tokenizer(params=None, config=layout).module
    pixels = jax.numpy.zeros((1, layout.stride, layout.stride, 3))
    return layout, lambda key: module.init(key, pixels)["params"]


def _text_init(config: ml_collections.ConfigDict):
    """(layout, init: key -> boxed params) of the configured T5 encoder."""
    layout = get_t5_layout(config.text.layout)
    tokens = jax.numpy.zeros((1, 2), jax.numpy.int32)
    return layout, lambda key: T5Encoder(layout).init(key, tokens, tokens > 0)["params"]


def _abstract(init, mesh, rules, dtype=None):
    """The params `init` makes, as ShapeDtypeStructs laid out by `rules` (in `dtype` if given)."""
    return sharding.abstract_arrays(jax.eval_shape(init, jax.random.key(0)), mesh, rules, dtype)


def _shardings(abstract):
    return jax.tree.map(lambda x: x.sharding, abstract)


def _frozen_params(where: str, init, seed: int, mesh, rules, dtype=jax.numpy.float32):
    """Random ("random") or params-checkpoint (a folder) weights in `dtype`, placed by `rules`; None for other
    sources."""
    abstract = _abstract(init, mesh, rules, dtype)
    if where == "random":
        cast = jax.jit(
            lambda key: jax.tree.map(lambda x: x.astype(dtype), nn.unbox(init(key))), out_shardings=_shardings(abstract)
        )
        return cast(jax.random.key(seed))
    if os.path.isdir(where) and os.path.isdir(os.path.join(where, "params")):
        return checkpoint.load_params(where, abstract)
    return None


def tokenizer_params(where: str, layout, abstract):
    """Tokenizer parameters from a params checkpoint folder or an official .pth/.safetensors, placed as `abstract`
    (ShapeDtypeStructs with shardings). Mismatching checkpoints fail naming every missing and unexpected key."""
    if os.path.isdir(os.path.join(where, "params")):
        return checkpoint.load_params(where, abstract)
    return jax.device_put(convert_tokenizer.load_official(where, layout), _shardings(abstract))


def load_tokenizer(config: ml_collections.ConfigDict, mesh, rules) -> Tokenizer:
    """The frozen tokenizer: "random", an official .pth/.safetensors, or a params-only checkpoint folder."""
    where = config.tokenizer.checkpoint
    if not where:
        raise ValueError(
            "set tokenizer.checkpoint: an official infinity_vae_*.pth, a params checkpoint folder, "
            "or 'random' (untrained weights, for smoke runs only)"
        )
    layout, init = _tokenizer_init(config)
    if where == "random":
        params = _frozen_params(where, init, config.seed, mesh, rules)
    else:
        params = tokenizer_params(where, layout, _abstract(init, mesh, rules))
    return Tokenizer(params=params, config=layout, dtype=jax.numpy.dtype(config.tokenizer.dtype))


def load_text_encoder(config: ml_collections.ConfigDict, mesh, rules):
    """The frozen T5 encoder's params: "random" (of `text.layout`), a params checkpoint, or a Hugging Face folder."""
    from infinity_jax.convert import t5 as convert_t5

    where = config.text.checkpoint
    if not where:
        raise ValueError("set text.checkpoint: a Hugging Face T5 folder (e.g. flan-t5-xl) or 'random'")
    layout, init = _text_init(config)
    if layout.d_model != config.model.text_dim:
        raise ValueError(f"T5 width {layout.d_model} != model.text_dim {config.model.text_dim}")
    dtype = jax.numpy.dtype(config.text.dtype)
    params = _frozen_params(where, init, config.seed + 1, mesh, rules, dtype)
    if params is None:
        params, found = convert_t5.load_pretrained(where, dtype)
        if found != layout:
            raise ValueError(f"the T5 in {where} is {found}, but text.layout={config.text.layout!r} is {layout}")
        params = jax.device_put(params, _shardings(_abstract(init, mesh, rules)))
    return params


def load(config: ml_collections.ConfigDict, mesh, step_config) -> Frozen:
    """Both towers (T5 only for text conditioning), placed by the step config's rules."""
    text = step_config.model.cond == "text"
    return Frozen(
        tokenizer=load_tokenizer(config, mesh, step_config.tokenizer_rules),
        text=load_text_encoder(config, mesh, step_config.text_rules) if text else None,
    )


def abstract(config: ml_collections.ConfigDict, mesh, step_config) -> Frozen:
    """The towers as ShapeDtypeStructs with their shardings (ahead-of-time compilation; nothing is loaded)."""
    layout, init = _tokenizer_init(config)
    params = _abstract(init, mesh, step_config.tokenizer_rules)
    tokenizer = Tokenizer(params=params, config=layout, dtype=jax.numpy.dtype(config.tokenizer.dtype))
    if step_config.model.cond != "text":
        return Frozen(tokenizer=tokenizer)
    _, init = _text_init(config)
    return Frozen(
        tokenizer=tokenizer, text=_abstract(init, mesh, step_config.text_rules, jax.numpy.dtype(config.text.dtype))
    )
