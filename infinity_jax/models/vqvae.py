"""VAR's multi-scale VQ-VAE tokenizer (`vae_ch160v4096z32`, REFERENCE §9) and its residual quantization.

    image ─▶ encoder (with attention) ─▶ quant_conv ─▶ f [B, h, w, Cvae]
    for k = 1..K:  r_k = area(f − f̂ → h_k×w_k) (the last scale unresized);  idx_k = nearest codebook entry
                   f̂ += φ_k(bicubic(codebook[idx_k] → h×w))
    f̂ ─▶ post_quant_conv ─▶ decoder (with attention) ─▶ image

φ(x) = (1 − ρ)·x + ρ·conv3×3(x) with ρ = 0.5; four convs are shared by the K scales, scale k using the one
whose tick (1/12, 1/3 + 1/12, …, 11/12) is nearest to k/(K−1). The transformer's input for scale k+1 is f̂ after
k scales, area-resized to scale k+1's grid.

The encoder and decoder are `bsq_vae`'s with `attention=True`; parameter paths mirror the official names
(`quantize/embedding` ↔ `quantize.embedding.weight`, `quantize/phis_2` ↔ `quantize.quant_resi.qresi_ls.2`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from infinity_jax.models import sizes
from infinity_jax.models.bsq_vae import Conv, Decoder, Encoder, TokenizerConfig
from infinity_jax.ops.resize import area_resize, bicubic_resize
from infinity_jax.schedules import Schedule

# vq-f16 of latent diffusion as VAR uses it: 160 channels, 5 levels, attention at 16× downsampling.
VAR_LAYOUT = TokenizerConfig(
    bits=sizes.VAR_VAE_DIM, base_ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention=True
)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Layout of a VAR tokenizer: the encoder/decoder, the codebook and the φ convs.

    vocab: codebook entries V; znorm: nearest neighbour by cosine similarity instead of Euclidean distance;
    num_phi: φ convs shared by the scales (0: none, φ is the identity); phi_ratio: ρ.
    """

    layout: TokenizerConfig = VAR_LAYOUT
    vocab: int = sizes.VAR_CODEBOOK_SIZE
    znorm: bool = False
    num_phi: int = 4
    phi_ratio: float = 0.5

    @property
    def dim(self) -> int:
        """Cvae: the latent channels, the width of a codebook entry."""
        return self.layout.bits


# The released VAR tokenizer, and a narrow one for tests.
VQVAES = {
    "vae_ch160v4096z32": VQVAEConfig(),
    "tiny": VQVAEConfig(
        TokenizerConfig(bits=8, base_ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attention=True), vocab=64
    ),
}


def phi_index(scale: int, num_scales: int, num_phi: int) -> int:
    """Which shared φ serves scale `scale` of `num_scales`: the nearest tick to scale/(num_scales − 1)."""
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi) if num_phi == 4 else (
        np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)
    )  # fmt: skip
    position = scale / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - position)))


class VQVAE(nn.Module):
    """Encoder, codebook, φ convs and decoder; the methods below are pure functions of the parameters."""

    config: VQVAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c.layout, self.dtype)
        self.decoder = Decoder(c.layout, self.dtype)
        self.quant_conv = Conv(c.dim, dtype=self.dtype)
        self.post_quant_conv = Conv(c.dim, dtype=self.dtype)
        self.quantize = Codebook(c)

    def encode(self, images):
        """images [B, H, W, 3] in [-1, 1] -> f [B, H/16, W/16, Cvae] float32."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def decode(self, f_hat):
        """f̂ [B, h, w, Cvae] -> images [B, 16h, 16w, 3] clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat.astype(self.dtype))), -1.0, 1.0)

    def quantize_multiscale(self, f, schedule: Schedule):
        """f [B, h, w, Cvae] -> (indices: per scale [B, h_k, w_k] int32, f̂ after each scale [B, h, w, Cvae])."""
        return self.quantize.multiscale(f, schedule)

    def lookup(self, indices):
        """[...] int codebook indices -> [..., Cvae] entries."""
        return self.quantize.lookup(indices)

    def add_scale(self, f_hat, entries, scale: int, schedule: Schedule):
        """f̂ + φ_k(bicubic(entries [B, h_k, w_k, Cvae] → the last grid)); scale k of `schedule` (static)."""
        return self.quantize.add_scale(f_hat, entries, scale, schedule)

    def next_inputs(self, indices, schedule: Schedule):
        """Teacher-forcing inputs of the transformer: per scale [B, h_k, w_k] indices -> [B, L − first, Cvae], f̂
        after scale k area-resized to scale k+1, for k = 1..K−1."""
        return self.quantize.next_inputs(indices, schedule)

    def __call__(self, images, schedule: Schedule):
        """images -> (indices per scale, reconstruction from all scales)."""
        indices, f_hats = self.quantize_multiscale(self.encode(images), schedule)
        return indices, self.decode(f_hats[-1])


class Codebook(nn.Module):
    """The V×Cvae codebook and the φ convs (official module `quantize`)."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.embedding = self.param("embedding", nn.initializers.uniform(1.0 / c.vocab), (c.vocab, c.dim))
        self.phis = [Conv(c.dim) for _ in range(c.num_phi)]

    def lookup(self, indices):
        return jnp.take(self.embedding, indices, axis=0)

    def phi(self, h, scale: int, num_scales: int):
        c = self.config
        if c.num_phi == 0:
            return h
        conv = self.phis[phi_index(scale, num_scales, c.num_phi)]
        return (1.0 - c.phi_ratio) * h + c.phi_ratio * conv(h)

    def nearest(self, r):
        """r [..., Cvae] -> [...] int32 index of the nearest codebook entry (the first on ties)."""
        e = self.embedding
        hi = jax.lax.Precision.HIGHEST
        if self.config.znorm:
            unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
            return jnp.argmax(jnp.einsum("...c,vc->...v", unit(r), unit(e), precision=hi), axis=-1).astype(jnp.int32)
        distance = (
            jnp.sum(r * r, axis=-1, keepdims=True)
            + jnp.sum(e * e, axis=-1)
            - 2.0 * jnp.einsum("...c,vc->...v", r, e, precision=hi)
        )
        return jnp.argmin(distance, axis=-1).astype(jnp.int32)

    def add_scale(self, f_hat, entries, scale: int, schedule: Schedule):
        h = entries if scale == schedule.num_scales - 1 else bicubic_resize(entries, schedule.grid)
        return f_hat + self.phi(h, scale, schedule.num_scales)

    def multiscale(self, f, schedule: Schedule):
        if tuple(f.shape[1:3]) != schedule.grid:
            raise ValueError(f"latent grid {tuple(f.shape[1:3])} is not the schedule's last grid {schedule.grid}")
        f = f.astype(jnp.float32)
        if self.is_initializing():  # a schedule may not reach every shared φ; all of them are parameters
            for conv in self.phis:
                conv(f)
        f_hat, indices, f_hats = jnp.zeros_like(f), [], []
        for k, grid in enumerate(schedule.scales):
            rest = f - f_hat
            idx = self.nearest(rest if k == schedule.num_scales - 1 else area_resize(rest, grid))
            f_hat = self.add_scale(f_hat, self.lookup(idx), k, schedule)
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def next_inputs(self, indices, schedule: Schedule):
        b = indices[0].shape[0]
        f_hat = jnp.zeros((b, *schedule.grid, self.config.dim), jnp.float32)
        inputs = []
        for k in range(schedule.num_scales - 1):
            f_hat = self.add_scale(f_hat, self.lookup(indices[k]), k, schedule)
            inputs.append(area_resize(f_hat, schedule.scales[k + 1]).reshape(b, -1, self.config.dim))
        return jnp.concatenate(inputs, axis=1)


@struct.dataclass
class VQTokenizer:
    """Frozen VQ-VAE parameters plus their layout (a pytree: jit its methods as functions of it; schedules static).

    params: the `VQVAE` parameters (e.g. from `convert.vqvae.load_official`); config: the layout; dtype: compute
    dtype of the convolutions (latents, codebook and images stay float32).
    """

    params: dict
    config: VQVAEConfig = struct.field(pytree_node=False)
    dtype: jnp.dtype = struct.field(pytree_node=False, default=jnp.float32)

    @classmethod
    def init(cls, config: VQVAEConfig, key: jax.Array, dtype=jnp.float32) -> VQTokenizer:
        """Random weights (tests)."""
        schedule = Schedule(((1, 1),))
        images = jnp.zeros((1, config.layout.stride, config.layout.stride, 3))
        return cls(nn.unbox(VQVAE(config).init(key, images, schedule)["params"]), config, dtype)

    def _apply(self, *args, method):
        return VQVAE(self.config, self.dtype).apply({"params": self.params}, *args, method=method)

    def encode(self, images):
        """images [B, H, W, 3] in [-1, 1] -> f [B, H/16, W/16, Cvae]."""
        return self._apply(images, method=VQVAE.encode)

    def tokenize(self, images, schedule: Schedule):
        """images -> per scale [B, h_k, w_k] int32 codebook indices."""
        return self._apply(self.encode(images), schedule, method=VQVAE.quantize_multiscale)[0]

    def decode(self, f_hat):
        """f̂ [B, h, w, Cvae] -> images in [-1, 1]."""
        return self._apply(f_hat, method=VQVAE.decode)

    def decode_indices(self, indices, schedule: Schedule):
        """Per scale [B, h_k, w_k] indices -> images in [-1, 1]."""
        f_hat = jnp.zeros((indices[0].shape[0], *schedule.grid, self.config.dim), jnp.float32)
        for k, idx in enumerate(indices):
            f_hat = self.add_scale(f_hat, self.lookup(idx), k, schedule)
        return self.decode(f_hat)

    def reconstruct(self, images, schedule: Schedule):
        """images -> images through all scales of `schedule`."""
        return self._apply(images, schedule, method=VQVAE.__call__)[1]

    def lookup(self, indices):
        return self._apply(indices, method=VQVAE.lookup)

    def add_scale(self, f_hat, entries, scale: int, schedule: Schedule):
        return self._apply(f_hat, entries, scale, schedule, method=VQVAE.add_scale)

    def next_inputs(self, indices, schedule: Schedule):
        """The transformer's teacher-forcing inputs [B, L − first, Cvae] (see `VQVAE.next_inputs`)."""
        return self._apply(indices, schedule, method=VQVAE.next_inputs)
