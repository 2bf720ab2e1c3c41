"""VAR's VQ-VAE state dict (`vae_ch160v4096z32.pth`, REFERENCE §9) <-> `models.vqvae.VQVAE` parameters.

The encoder, decoder, `quant_conv` and `post_quant_conv` use the tokenizer converter's names in their plain
spelling (`encoder.down.4.attn.0.qkv.weight`); the codebook is `quantize.embedding.weight` [V, Cvae] and φ_i is
`quantize.quant_resi.qresi_ls.{i}`. The usage statistics buffer `quantize.ema_vocab_hit_SV` is not a parameter
(exported as zeros, so that the official `load_state_dict(strict=True)` accepts the file).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from infinity_jax.convert.common import apply_rules, export_rules, leaf_paths, read_state_dict
from infinity_jax.convert.tokenizer import conv_rules, official_names
from infinity_jax.models.vqvae import VQVAE, VQVAEConfig
from infinity_jax.schedules import Schedule

BUFFER = "quantize.ema_vocab_hit_SV"


def _names(path: tuple[str, ...]) -> tuple[str, ...]:
    if path == ("quantize", "embedding"):
        return ("quantize.embedding.weight",)
    phi = re.fullmatch(r"phis_(\d+)", path[1]) if path[0] == "quantize" else None
    if phi:
        return (f"quantize.quant_resi.qresi_ls.{phi.group(1)}.{'weight' if path[-1] == 'kernel' else 'bias'}",)
    return (official_names(path)[1],)  # VAR's own modules use the plain spelling


def _abstract_params(config: VQVAEConfig):
    schedule = Schedule(((1, 1),))
    images = jnp.zeros((1, config.layout.stride, config.layout.stride, 3))
    return jax.eval_shape(lambda key: VQVAE(config).init(key, images, schedule), jax.random.key(0))["params"]


def convert_state_dict(state_dict: Mapping[str, object], config: VQVAEConfig):
    """Official VQ-VAE state dict -> our params (float32). Raises CheckpointMismatchError listing every problem."""
    abstract = _abstract_params(config)
    return apply_rules(state_dict, conv_rules(abstract, _names), abstract, ignore=lambda name: name == BUFFER)


def export_state_dict(params, config: VQVAEConfig, schedule: Schedule) -> dict[str, np.ndarray]:
    """Our params -> the official state dict (float32; the usage buffer zeroed for `schedule`'s scales)."""
    state = export_rules(params, conv_rules(_abstract_params(config), _names))
    state[BUFFER] = np.zeros((schedule.num_scales, config.vocab), np.float32)
    return state


def load_official(path: str, config: VQVAEConfig):
    """Reads `vae_ch160v4096z32.pth` (a plain state dict)."""
    return convert_state_dict(read_state_dict(path), config)


def infer_config(state_dict: Mapping[str, object]) -> VQVAEConfig:
    """The VQ-VAE layout of an official state dict (VAR's fixed ch_mult (1, 1, 2, 2, 4); width, Cvae, V, φ count
    read off the shapes)."""
    from infinity_jax.convert.tokenizer import infer_layout

    if "quantize.embedding.weight" not in state_dict:
        raise ValueError("not a VAR VQ-VAE state dict: no quantize.embedding.weight")
    vocab, _ = state_dict["quantize.embedding.weight"].shape
    phis = {int(m.group(1)) for n in state_dict if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", n))}
    return VQVAEConfig(infer_layout(state_dict, attention=True), vocab=int(vocab), num_phi=len(phis))


def official_layout(config: VQVAEConfig) -> dict[str, tuple[int, ...]]:
    """The official parameter names and torch shapes of a VQ-VAE layout (the usage buffer excluded)."""
    layout = {}
    for target, leaf in leaf_paths(_abstract_params(config)):
        shape = tuple(leaf.shape)
        layout[_names(target)[0]] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    return layout
