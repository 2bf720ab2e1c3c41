"""The PatchGAN discriminator of tokenizer training (REFERENCE §2.6: 3 layers, 64 base channels).

pix2pix's N-layer layout: a 4×4 stride-2 conv with LeakyReLU(0.2), then `layers − 1` more stride-2 convs and one
stride-1 conv, each doubling the width (at most 8× base) with a norm and LeakyReLU, and a 4×4 stride-1 conv to one
logit per patch. A 128² image gives 14×14 patch logits, a 256² one 30×30.

GroupNorm replaces pix2pix's BatchNorm: it keeps the discriminator a pure function of its parameters (no running
statistics to thread through the step and the checkpoint, no cross-device batch reduction under a sharded batch).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from infinity_jax.models.bsq_vae import Conv, Norm


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    layers: int = 3
    base_ch: int = 64

    def __post_init__(self):
        if self.layers < 1 or self.base_ch < 1:
            raise ValueError(f"discriminator layers and base_ch must be positive, got {self.layers}, {self.base_ch}")


class PatchDiscriminator(nn.Module):
    config: DiscriminatorConfig = DiscriminatorConfig()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """images [B, H, W, 3] in [-1, 1] -> patch logits [B, H/2^layers − 2, W/2^layers − 2] float32."""
        c = self.config
        h = Conv(c.base_ch, kernel=4, strides=2, padding=1, dtype=self.dtype, name="conv_in")(images)
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, c.layers + 1):
            stride = 2 if n < c.layers else 1
            width = c.base_ch * min(2**n, 8)
            h = Conv(width, kernel=4, strides=stride, padding=1, dtype=self.dtype, name=f"conv_{n}")(h)
            h = nn.leaky_relu(Norm(self.dtype, name=f"norm_{n}")(h), 0.2)
        logits = Conv(1, kernel=4, strides=1, padding=1, dtype=self.dtype, name="conv_out")(h)
        return logits[..., 0].astype(jnp.float32)
