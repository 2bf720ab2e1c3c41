"""Official BSQ-VAE state dicts (REFERENCE §6.4) -> `models.bsq_vae.BSQVAE` parameters.

Our module path `encoder/down_1/block_0/conv1/conv/kernel` is the official `encoder.down.1.block.0.conv1.conv.weight`
with levels and blocks indexed by dots; the official loader also accepts the unwrapped spelling without the last
`.conv`/`.norm` (`encoder.down.1.block.0.conv1.weight`), so both are accepted here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from infinity_jax.convert.common import Rule, apply_rules, conv_kernel, load_torch_state_dict
from infinity_jax.models.bsq_vae import BSQVAE, TokenizerConfig

# 2^[d-1..0] for integer labels, not a parameter; `quantize` is an alias of `quantizer` in the official module.
BUFFERS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def official_names(path: tuple[str, ...]) -> tuple[str, str]:
    """(wrapped, plain) official names of one parameter path."""
    parts, in_level = [], False
    for part in path[:-1]:
        level = re.fullmatch(r"(down|up)_(\d+)", part)
        block = re.fullmatch(r"block_(\d+)", part)
        if level:
            parts += [level.group(1), level.group(2)]
            in_level = True
        elif block and in_level:  # `mid` keeps block_1/block_2 as names
            parts += ["block", block.group(1)]
        else:
            parts.append(part)
    leaf = _LEAF_NAMES[path[-1]]
    return ".".join([*parts, leaf]), ".".join([*parts[:-1], leaf])


def _abstract_params(config: TokenizerConfig):
    model = BSQVAE(config)
    stride = config.stride
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, stride, stride, 3)))["params"]


def convert_state_dict(state_dict: Mapping[str, object], config: TokenizerConfig):
    """Official VAE state dict -> our params (float32). Raises CheckpointMismatchError listing every problem."""
    abstract = _abstract_params(config)
    rules = []
    for path, _ in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]:
        target = tuple(k.key for k in path)
        rules.append(Rule(target, official_names(target), conv_kernel))
    return apply_rules(state_dict, rules, abstract, ignore=lambda name: name in BUFFERS)


def load_official(path: str, config: TokenizerConfig, use_ema: bool = False):
    """Reads an official tokenizer file (`{"vae": state_dict}`, `{"ema": …}` or a plain state dict)."""
    state_dict = load_torch_state_dict(path, containers=("ema",) if use_ema else ("vae",))
    return convert_state_dict(state_dict, config)
