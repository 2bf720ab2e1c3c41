"""Official BSQ-VAE state dicts (REFERENCE §6.4) <-> `models.bsq_vae.BSQVAE` parameters.

Our module path `encoder/down_1/block_0/conv1/conv/kernel` is the official `encoder.down.1.block.0.conv1.conv.weight`
with levels and blocks indexed by dots; the official loader also accepts the unwrapped spelling without the last
`.conv`/`.norm` (`encoder.down.1.block.0.conv1.weight`), so both are accepted here; `export_state_dict` writes
the wrapped spelling (the model's own) and the quantizer's mask buffer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import (
    Rule,
    apply_rules,
    conv_kernel,
    export_rules,
    leaf_paths,
    read_state_dict,
    torch_conv_weight,
)
from infinity_jax.models.bsq_vae import BSQVAE, TokenizerConfig

# 2^[d-1..0] for integer labels, not a parameter; `quantize` is an alias of `quantizer` in the official module.
BUFFERS = ("quantizer.lfq.mask", "quantize.lfq.mask")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def official_names(path: tuple[str, ...]) -> tuple[str, str]:
    """(wrapped, plain) official names of one parameter path."""
    parts, in_level = [], False
    for part in path[:-1]:
        level = re.fullmatch(r"(down|up)_(\d+)", part)
        block = re.fullmatch(r"(block|attn)_(\d+)", part)
        if level:
            parts += [level.group(1), level.group(2)]
            in_level = True
        elif block and in_level:  # `mid` keeps block_1/block_2/attn_1 as names
            parts += [block.group(1), block.group(2)]
        else:
            parts.append(part)
    leaf = _LEAF_NAMES[path[-1]]
    return ".".join([*parts, leaf]), ".".join([*parts[:-1], leaf])


def _abstract_params(config: TokenizerConfig):
    model = BSQVAE(config)
    stride = config.stride
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, stride, stride, 3)))["params"]


def conv_rules(abstract, names=official_names) -> list[Rule]:
    """Rules of a convolutional tokenizer: each leaf from its official name(s), conv kernels transposed."""
    return [Rule(target, names(target), conv_kernel, torch_conv_weight) for target, _ in leaf_paths(abstract)]


def convert_state_dict(state_dict: Mapping[str, object], config: TokenizerConfig):
    """Official VAE state dict -> our params (float32). Raises CheckpointMismatchError listing every problem."""
    abstract = _abstract_params(config)
    return apply_rules(state_dict, conv_rules(abstract), abstract, ignore=lambda name: name in BUFFERS)


def export_state_dict(params, config: TokenizerConfig) -> dict[str, np.ndarray]:
    """Our params -> the official state dict (wrapped names, float32, with the `quantizer.lfq.mask` buffer)."""
    state = export_rules(params, conv_rules(_abstract_params(config)))
    state[BUFFERS[0]] = 2 ** np.arange(config.bits - 1, -1, -1, dtype=np.int64)
    return state


def load_official(path: str, config: TokenizerConfig, use_ema: bool = False):
    """Reads an official tokenizer file (`{"vae": state_dict}`, `{"ema": …}` or a plain state dict)."""
    state_dict = read_state_dict(path, containers=("ema",) if use_ema else ("vae",))
    return convert_state_dict(state_dict, config)


def _conv_out_channels(state_dict: Mapping[str, object], name: str) -> int:
    """Output channels of the conv `name` (either spelling)."""
    for key in (f"{name}.conv.weight", f"{name}.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise ValueError(f"not a tokenizer state dict: no {name}.weight")


def infer_layout(state_dict: Mapping[str, object], attention: bool = False) -> TokenizerConfig:
    """The encoder/decoder layout of an official tokenizer state dict, read off its names and shapes."""
    levels = sorted({int(m.group(1)) for n in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", n))})
    if not levels:
        raise ValueError("not a tokenizer state dict: no encoder.down.{i} levels")
    blocks = {int(m.group(1)) for n in state_dict if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))}
    base = _conv_out_channels(state_dict, "encoder.conv_in")
    widths = [_conv_out_channels(state_dict, f"encoder.down.{i}.block.0.conv1") for i in levels]
    downs = sum(any(n.startswith(f"encoder.down.{i}.downsample.") for n in state_dict) for i in levels)
    stride = 2**downs
    return TokenizerConfig(
        bits=_conv_out_channels(state_dict, "encoder.conv_out"),
        stride=stride,
        base_ch=base,
        ch_mult=tuple(w // base for w in widths),
        num_res_blocks=len(blocks),
        patchify=stride == 8,  # the released f8 tokenizer serves the 8B model through 2×2 patchify
        attention=attention,
    )


def layout_name(layout: TokenizerConfig, source: str = "") -> str:
    """The released name of a layout (d16 … d14_f8; d32reg when the file name says "reg"), or "custom"."""
    from infinity_jax.models.bsq_vae import TOKENIZERS

    names = [n for n, t in TOKENIZERS.items() if t == layout]
    if "d32reg" in names and "reg" not in os.path.basename(source):
        names.remove("d32reg")
    return names[0] if names else "custom"
