"""Builds and runs the official VAR (PyTorch, CPU, random weights) for parity tests of ours.

The official code is imported at run time from a checkout of github.com/FoundationVision/VAR named by
VAR_OFFICIAL (its root holds `dist.py` and the `models` package); nothing of it is copied here. Its optional
kernels (flash_attn, xformers, fused ops) are absent on CPU, so it takes its plain torch paths. The models are built
with their classes, not `build_vae_var`, which replaces `reset_parameters` of torch's layers for the whole process.

The official models run in float64 (`official_infinity.running` keeps its `.float()` casts in float64); ours in
float32.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types

import torch

from tests.parity.official_infinity import running

__all__ = ["build", "load", "randomize", "running"]


def load(checkout: str) -> types.SimpleNamespace:
    """Imports `models.vqvae` and `models.var` from the checkout (its root goes first on sys.path)."""
    root = os.path.abspath(checkout)
    if not os.path.isfile(os.path.join(root, "models", "var.py")):
        raise FileNotFoundError(f"{checkout} is not a checkout of FoundationVision/VAR (no models/var.py)")
    if root not in sys.path:
        sys.path.insert(0, root)
    with running(torch.float32):
        return types.SimpleNamespace(
            vqvae=importlib.import_module("models.vqvae"), var=importlib.import_module("models.var")
        )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (float32 values), so that none hides behind its initialisation: matrices and convs
    normal(0, 1/fan_in), the codebook normal(0, 1), norm gains 1 + normal(0, 0.1), biases, tables and embeddings
    normal(0, 0.1), the log attention scales ln 4 ± 0.3."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape, leaf = param.shape, name.rsplit(".", 1)[-1]
            if leaf == "scale_mul_1H11":
                value = math.log(4.0) + (torch.rand(shape, generator=gen) * 0.6 - 0.3)
            elif name == "quantize.embedding.weight":
                value = torch.randn(shape, generator=gen)
            elif "norm" in name and leaf == "weight" and param.ndim == 1:
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif param.ndim == 1 or leaf in ("pos_1LC", "pos_start", "ada_gss") or "embed" in name:
                value = 0.1 * torch.randn(shape, generator=gen)
            else:
                value = torch.randn(shape, generator=gen) / math.sqrt(shape[1:].numel())
            param.copy_(value.to(torch.float32))


def build(mods, *, vocab, dim, ch, patch_nums, depth, embed_dim, num_heads, shared_aln, seed):
    """(official VQVAE, official VAR), random weights, float64, eval mode, condition dropout off."""
    vae = mods.vqvae.VQVAE(
        vocab_size=vocab, z_channels=dim, ch=ch, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums
    )
    with running(torch.float32), open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet  # the constructor prints its configuration
        try:
            var = mods.var.VAR(
                vae, num_classes=1000, depth=depth, embed_dim=embed_dim, num_heads=num_heads, drop_path_rate=0.0,
                shared_aln=shared_aln, attn_l2_norm=True, patch_nums=patch_nums, flash_if_available=False,
                fused_if_available=False,
            )  # fmt: skip
        finally:
            sys.stdout = stdout
    randomize(vae, seed)
    randomize(var, seed + 1)
    var.cond_drop_rate = 0.0  # the official forward drops labels whatever the mode
    return vae.double().eval(), var.double().eval()
