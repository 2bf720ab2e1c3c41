"""Hugging Face T5 weights <-> `models.t5.T5Encoder` parameters.

Reads a local folder as written by `save_pretrained` of `T5EncoderModel` or `T5ForConditionalGeneration`
(`model.safetensors`, `pytorch_model.bin`, or their sharded `*.index.json` forms, plus `config.json`), or a hub
name (e.g. google/flan-t5-xl) through the Hugging Face cache, downloading only the encoder's files where the hub
is reachable. Decoder and LM-head weights are known and ignored; anything else unknown, missing or misshapen fails
with the full list. `export_state_dict` writes a `T5EncoderModel` state dict.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import Rule, apply_rules, export_rules, leaf_paths, read_state_dict
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


def _rules(config: T5Config) -> list[Rule]:
    return [Rule(t, hf_names(t), _transform(t), _transform(t)) for t, _ in leaf_paths(abstract_params(config))]


def abstract_params(config: T5Config):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(T5Encoder(config).init, jax.random.key(0), tokens, tokens > 0)["params"]


def convert_state_dict(state_dict: Mapping[str, object], config: T5Config, dtype=np.float32):
    """HF state dict -> our params. Raises CheckpointMismatchError listing every problem."""

    def ignore(name: str) -> bool:
        # T5ForConditionalGeneration files hold the decoder, the LM head and a second copy of the embedding.
        return bool(_DECODER.match(name)) or name == "encoder.embed_tokens.weight"

    return apply_rules(state_dict, _rules(config), abstract_params(config), ignore=ignore, dtype=dtype)


def export_state_dict(params, config: T5Config) -> dict[str, np.ndarray]:
    """Our params -> a `T5EncoderModel` state dict (float32; the shared embedding under both of its names)."""
    state = export_rules(params, _rules(config))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return state


# What a hub download of an encoder needs: its config and weights, never the decoder-only extras.
HUB_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def resolve(name_or_folder: str) -> str:
    """A local folder as is; otherwise a hub name -> its snapshot folder in the Hugging Face cache (downloaded
    where the hub is reachable, read from the cache with HF_HUB_OFFLINE=1)."""
    if os.path.isdir(name_or_folder):
        return name_or_folder
    if os.path.exists(name_or_folder) or name_or_folder.count("/") != 1:
        raise FileNotFoundError(f"{name_or_folder!r} is neither a folder nor a hub name such as google/flan-t5-xl")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_folder, allow_patterns=list(HUB_FILES))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{name_or_folder} is not in the Hugging Face cache and the hub cannot be reached ({error}); "
            "download it once (huggingface-cli download NAME) or pass a local folder"
        ) from None


def load_pretrained(name_or_folder: str, dtype=np.float32) -> tuple[dict, T5Config]:
    """(params, config) of the encoder in a Hugging Face folder or hub name (config.json + weights)."""
    folder = resolve(name_or_folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = T5Config.from_hf(json.load(f))
    return convert_state_dict(read_state_dict(folder), config, dtype), config
