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


def _place(params, module: nn.Module, inputs, mesh, rules):
    """Host arrays -> device arrays laid out by the module's logical axis names under `rules`."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    boxed = jax.eval_shape(lambda key: module.init(key, *inputs)["params"], jax.random.key(0))
    return jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules))


def load_tokenizer(config: ml_collections.ConfigDict, mesh, rules) -> Tokenizer:
    """The frozen tokenizer: "random", an official .pth/.safetensors, or a params-only checkpoint folder."""
    layout = config_lib.tokenizer_layout(config.tokenizer)
    where = config.tokenizer.checkpoint
    dtype = jax.numpy.dtype(config.tokenizer.dtype)
    if not where:
        raise ValueError(
            "set tokenizer.checkpoint: an official infinity_vae_*.pth, a params checkpoint folder, "
            "or 'random' (untrained weights, for smoke runs only)"
        )
    module = Tokenizer(params=None, config=layout).module
    pixels = jax.numpy.zeros((1, layout.stride, layout.stride, 3))
    params = _frozen_params(where, lambda key: module.init(key, pixels)["params"], config.seed, mesh, rules)
    if params is None:
        params = _place(convert_tokenizer.load_official(where, layout), module, pixels, mesh, rules)
    return Tokenizer(params=params, config=layout, dtype=dtype)


def _frozen_params(where: str, init, seed: int, mesh, rules, dtype=jax.numpy.float32):
    """Random ("random") or params-checkpoint (a folder) weights in `dtype`, placed by `rules`; None for other
    sources."""
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    if where == "random":
        cast = jax.jit(
            lambda key: jax.tree.map(lambda x: x.astype(dtype), nn.unbox(init(key))), out_shardings=shardings
        )
        return cast(jax.random.key(seed))
    if os.path.isdir(where) and os.path.isdir(os.path.join(where, "params")):
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), nn.unbox(boxed), shardings
        )
        return checkpoint.load_params(where, abstract)
    return None


def load_text_encoder(config: ml_collections.ConfigDict, mesh, rules):
    """The frozen T5 encoder's params: "random" (of `text.layout`), a params checkpoint, or a Hugging Face folder."""
    from infinity_jax.convert import t5 as convert_t5

    layout = get_t5_layout(config.text.layout)
    where = config.text.checkpoint
    if not where:
        raise ValueError("set text.checkpoint: a Hugging Face T5 folder (e.g. flan-t5-xl) or 'random'")
    if layout.d_model != config.model.text_dim:
        raise ValueError(f"T5 width {layout.d_model} != model.text_dim {config.model.text_dim}")
    tokens = jax.numpy.zeros((1, 2), jax.numpy.int32)
    module = T5Encoder(layout)
    dtype = jax.numpy.dtype(config.text.dtype)

    def init(key):
        return module.init(key, tokens, tokens > 0)["params"]

    params = _frozen_params(where, init, config.seed + 1, mesh, rules, dtype)
    if params is None:
        params, found = convert_t5.load_pretrained(where, dtype)
        if found != layout:
            raise ValueError(f"the T5 in {where} is {found}, but text.layout={config.text.layout!r} is {layout}")
        params = _place(params, module, (tokens, tokens > 0), mesh, rules)
    return params


def text_tokenizer_path(config: ml_collections.ConfigDict) -> str:
    path = config.text.tokenizer or config.text.checkpoint
    if not path or path == "random":
        raise ValueError("set text.tokenizer: a Hugging Face model folder or a T5 tokenizer.json")
    return path


def load(config: ml_collections.ConfigDict, mesh, step_config) -> Frozen:
    """Both towers (T5 only for text conditioning), placed by the step config's rules."""
    text = step_config.model.cond == "text"
    return Frozen(
        tokenizer=load_tokenizer(config, mesh, step_config.tokenizer_rules),
        text=load_text_encoder(config, mesh, step_config.text_rules) if text else None,
    )


def abstract(config: ml_collections.ConfigDict, mesh, step_config) -> Frozen:
    """The towers as ShapeDtypeStructs with their shardings (ahead-of-time compilation; nothing is loaded)."""
    layout = config_lib.tokenizer_layout(config.tokenizer)
    module = Tokenizer(params=None, config=layout).module
    pixels = jax.numpy.zeros((1, layout.stride, layout.stride, 3))
    tokenizer = Tokenizer(
        params=_abstract(lambda key: module.init(key, pixels)["params"], mesh, step_config.tokenizer_rules),
        config=layout,
        dtype=jax.numpy.dtype(config.tokenizer.dtype),
    )
    if step_config.model.cond != "text":
        return Frozen(tokenizer=tokenizer)
    tokens = jax.numpy.zeros((1, 2), jax.numpy.int32)
    t5 = T5Encoder(get_t5_layout(config.text.layout))
    text = _abstract(lambda key: t5.init(key, tokens, tokens > 0)["params"], mesh, step_config.text_rules,
                     jax.numpy.dtype(config.text.dtype))  # fmt: skip
    return Frozen(tokenizer=tokenizer, text=text)


def _abstract(init, mesh, rules, dtype=None):
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
