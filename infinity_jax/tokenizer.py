"""The tokenizer API shared by the trainer, the sampler and the notebook.

A `Tokenizer` is a pytree (its parameters are leaves, its layout is static), so its methods can be jitted as
functions of it: `jax.jit(Tokenizer.encode)(tok, images)`; methods that take a schedule need it static
(`jax.jit(Tokenizer.tokenize, static_argnums=2)`).

Bits and schedules are at the transformer's level: for the 8B model's f8 tokenizer with 2×2 patchify, one token
holds 4·d bits and the schedule's grids are half the latent's (REFERENCE §5.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from infinity_jax import quantizer
from infinity_jax.models.bsq_vae import BSQVAE, TokenizerConfig
from infinity_jax.ops.patchify import pixel_shuffle, pixel_unshuffle
from infinity_jax.schedules import Schedule


def check_images(images, stride: int) -> None:
    """Clear errors for images that the encoder cannot take; NaNs are checked on concrete (non-traced) inputs."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] (RGB, channels last), got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point in [-1, 1], got {images.dtype}; convert uint8 pixels with infinity_jax.images.to_unit"
        )
    height, width = images.shape[1:3]
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not divisible by the tokenizer stride {stride}")
    if not isinstance(images, jax.core.Tracer) and bool(jnp.isnan(jnp.asarray(images)).any()):
        raise ValueError("images contain NaN")


@struct.dataclass
class Tokenizer:
    """Frozen BSQ-VAE parameters plus their layout.

    params: the `BSQVAE` parameters (plain arrays, e.g. from `convert.tokenizer.load_official`).
    config: the layout; dtype: compute dtype of the convolutions (latents and images are float32).
    """

    params: dict
    config: TokenizerConfig = struct.field(pytree_node=False)
    dtype: jnp.dtype = struct.field(pytree_node=False, default=jnp.float32)

    @classmethod
    def init(cls, config: TokenizerConfig, key: jax.Array, dtype=jnp.float32) -> Tokenizer:
        """Random weights (for tests and for training a tokenizer from scratch)."""
        dummy = jnp.zeros((1, config.stride, config.stride, 3))
        params = nn.unbox(BSQVAE(config).init(key, dummy)["params"])
        return cls(params=params, config=config, dtype=dtype)

    @property
    def module(self) -> BSQVAE:
        return BSQVAE(self.config, self.dtype)

    def latent_schedule(self, schedule: Schedule) -> Schedule:
        """The schedule on the latent grid: the transformer's, or twice it for the patchified f8 tokenizer."""
        return schedule.upsampled(2) if self.config.patchify else schedule

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> latent [B, H/stride, W/stride, d] float32."""
        check_images(images, self.config.stride)
        return self.module.apply({"params": self.params}, images, method=BSQVAE.encode)

    def decode_latent(self, latent: jax.Array) -> jax.Array:
        """latent [B, h, w, d] -> images [B, h·stride, w·stride, 3] in [-1, 1]."""
        if latent.ndim != 4 or latent.shape[-1] != self.config.bits:
            raise ValueError(f"latent must be [B, h, w, {self.config.bits}], got shape {tuple(latent.shape)}")
        return self.module.apply({"params": self.params}, latent, method=BSQVAE.decode)

    def tokenize(self, images: jax.Array, schedule: Schedule) -> tuple[jax.Array, ...]:
        """images -> bits per scale, [B, h_k, w_k, token_bits] int32 on the transformer's grids."""
        latent = self.encode(images)
        ms = quantizer.multiscale_quantize(latent, self._check_grid(latent, schedule))
        return tuple(pixel_unshuffle(b) for b in ms.bits) if self.config.patchify else ms.bits

    def decode_bits(self, bits: Sequence[jax.Array], schedule: Schedule) -> jax.Array:
        """Bits per scale (as `tokenize` returns them) -> images: codes summed on the latent grid, then decoded."""
        if len(bits) != schedule.num_scales:
            raise ValueError(f"schedule {schedule.name} has {schedule.num_scales} scales, got bits for {len(bits)}")
        for b, (h, w) in zip(bits, schedule.scales, strict=True):
            if b.ndim != 4 or tuple(b.shape[1:]) != (h, w, self.config.token_bits):
                raise ValueError(
                    f"bits of a {h}x{w} scale must be [B, {h}, {w}, {self.config.token_bits}], got {b.shape}"
                )
        if self.config.patchify:
            bits = [pixel_shuffle(b) for b in bits]
        return self.decode_latent(quantizer.bits_to_latent(bits, self.latent_schedule(schedule).grid))

    def reconstruct(self, images: jax.Array, schedule: Schedule) -> jax.Array:
        """images -> multi-scale quantized -> decoded images of the same shape."""
        latent = self.encode(images)
        return self.decode_latent(quantizer.multiscale_quantize(latent, self._check_grid(latent, schedule)).latent)

    def _check_grid(self, latent: jax.Array, schedule: Schedule) -> Schedule:
        vae_schedule = self.latent_schedule(schedule)
        if tuple(latent.shape[1:3]) != vae_schedule.grid:
            height, width = np.multiply(latent.shape[1:3], self.config.stride)
            raise ValueError(
                f"images of {height}x{width} do not fit schedule {schedule.name} "
                f"(which needs {schedule.pixel_size[0]}x{schedule.pixel_size[1]})"
            )
        return vae_schedule
