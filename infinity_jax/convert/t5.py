"""Hugging Face T5 weights -> `models.t5.T5Encoder` parameters.

Reads a local folder (or a file) as written by `save_pretrained` of `T5EncoderModel` or
`T5ForConditionalGeneration`: `model.safetensors`, `pytorch_model.bin`, or their sharded `*.index.json` forms,
plus `config.json`. Decoder and LM-head weights are known and ignored; anything else unknown, missing or misshapen
fails with the full list.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import Rule, apply_rules, load_torch_state_dict
from infinity_jax.models.t5 import T5Config, T5Encoder

_DECODER = re.compile(r"^(decoder\.|lm_head\.)")
_SUBLAYER = {"attn_norm": "layer.0.layer_norm", "ffn_norm": "layer.1.layer_norm"}


def hf_names(path: tuple[str, ...]) -> tuple[str, ...]:
    """The Hugging Face names of one parameter path (with and without the `encoder.` prefix of shared)."""
    if path == ("shared", "embedding"):
        return ("shared.weight", "encoder.embed_tokens.weight")
    if path == ("relative_attention_bias",):
        return ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)
    if path == ("final_norm", "weight"):
        return ("encoder.final_layer_norm.weight",)
    block, module = int(path[0].removeprefix("block_")), path[1]
    prefix = f"encoder.block.{block}"
    if module in _SUBLAYER:
        return (f"{prefix}.{_SUBLAYER[module]}.weight",)
    if module in ("q", "k", "v", "o"):
        return (f"{prefix}.layer.0.SelfAttention.{module}.weight",)
    return (f"{prefix}.layer.1.DenseReluDense.{module}.weight",)


def _transform(path: tuple[str, ...]):
    # torch Linear stores [out, in]; flax kernels are [in, out]. Embeddings and norms keep their layout.
    return np.transpose if path[-1] == "kernel" else np.asarray


def abstract_params(config: T5Config):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(T5Encoder(config).init, jax.random.key(0), tokens, tokens > 0)["params"]


def convert_state_dict(state_dict: Mapping[str, object], config: T5Config, dtype=np.float32):
    """HF state dict -> our params. Raises CheckpointMismatchError listing every problem."""
    abstract = abstract_params(config)
    rules = []
    for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]:
        target = tuple(k.key for k in path)
        rules.append(Rule(target, hf_names(target), _transform(target)))

    def ignore(name: str) -> bool:
        # T5ForConditionalGeneration files hold the decoder, the LM head and a second copy of the embedding.
        return bool(_DECODER.match(name)) or name == "encoder.embed_tokens.weight"

    return apply_rules(state_dict, rules, abstract, ignore=ignore, dtype=dtype)


def _weight_files(folder: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for pattern in ("model.safetensors", "pytorch_model.bin", "*.safetensors"):
        found = sorted(glob.glob(os.path.join(folder, pattern)))
        if found:
            return found
    raise FileNotFoundError(f"no T5 weights (model.safetensors, pytorch_model.bin or an index) in {folder}")


def load_pretrained(folder: str, dtype=np.float32) -> tuple[dict, T5Config]:
    """(params, config) of the encoder in a local Hugging Face folder (config.json + weights)."""
    with open(os.path.join(folder, "config.json")) as f:
        config = T5Config.from_hf(json.load(f))
    state_dict = {}
    for path in _weight_files(folder):
        state_dict.update(load_torch_state_dict(path))
    return convert_state_dict(state_dict, config, dtype), config
