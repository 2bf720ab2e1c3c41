"""Running the official PyTorch implementation beside ours, for parity tests and benchmarks.

The official code is never part of this package: `import_official` imports modules from a checkout of
github.com/FoundationVision/Infinity that the user names. Its package `__init__` files import flash_attn and other
extras that the compared modules do not need, so the `infinity` and `infinity.models` packages are created empty
and `torchvision`/`imageio` (imported, unused by the tokenizer and quantizer) are stubbed when absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types


def import_official(checkout: str, name: str):
    """Imports e.g. "infinity.models.bsq_vae.vae" from the official checkout at `checkout`."""
    root = os.path.abspath(checkout)
    if not os.path.isdir(os.path.join(root, "infinity", "models")):
        raise FileNotFoundError(f"{checkout} is not a checkout of FoundationVision/Infinity (no infinity/models)")
    for package in ("infinity", "infinity.models"):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [os.path.join(root, *package.split("."))]
            sys.modules[package] = module
    for stub in ("torchvision", "imageio"):
        if stub not in sys.modules and importlib.util.find_spec(stub) is None:
            sys.modules[stub] = types.ModuleType(stub)
            if stub == "torchvision":
                sys.modules["torchvision.transforms"] = sys.modules[stub].transforms = types.ModuleType("transforms")
    return importlib.import_module(name)


def official_tokenizer(checkout: str, config):
    """The official BSQ-VAE with random weights for a `TokenizerConfig` (eval mode, no gradients)."""
    vae_module = import_official(checkout, "infinity.models.bsq_vae.vae")
    return vae_module.vae_model(
        None, "dynamic", config.bits, 2**config.bits, test_mode=True, patch_size=config.stride,
        encoder_ch_mult=list(config.ch_mult), decoder_ch_mult=list(config.ch_mult),
    )  # fmt: skip
