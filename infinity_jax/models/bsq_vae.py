"""The BSQ-VAE visual tokenizer (REFERENCE §2): a convolutional encoder/decoder around the bitwise quantizer.

Channels last. Conv → GroupNorm(32, eps 1e-6) → swish residual blocks, no attention; stride-2 downsampling with
zero padding on the bottom/right only; nearest ×2 upsampling followed by a 3×3 conv; the encoder emits exactly d
channels (no KL, no projection), the decoder reads them back. The same encoder and decoder with single-head
self-attention in the lowest-resolution level and the middle (`attention=True`) are VAR's VQ-VAE
(`models/vqvae.py`, REFERENCE §9).

Module names mirror the official state dict (`encoder/down_1/block_0/conv1/kernel` ↔
`encoder.down.1.block.0.conv1.conv.weight`), so converting an official checkpoint is renaming and transposing.
Every parameter and the main activations carry logical axis names, so the frozen tokenizer runs batch-sharded
under `sharding.TOKENIZER_RULES` (weights replicated).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACT_AXES = ("act_batch", "act_height", "act_width", "act_channels")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Layout of one tokenizer.

    bits: d, the latent channels = bits per token.
    stride: pixels per latent cell (16, or 8 for the 8B model's tokenizer).
    ch_mult: channel multipliers of the levels (base_ch each); the first log2(stride) levels downsample.
    patchify: the transformer sees 2×2 latent cells as one token (4·d bits; stride 8 only).
    attention: self-attention after every block of the lowest-resolution level and in the middle (VAR's VQ-VAE).
    """

    bits: int = 32
    stride: int = 16
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patchify: bool = False
    attention: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        num_down = round(math.log2(self.stride)) if self.stride > 0 else -1
        if self.stride < 1 or 2**num_down != self.stride or num_down > len(self.ch_mult) - 1:
            raise ValueError(
                f"stride {self.stride} must be a power of two reachable with {len(self.ch_mult)} levels "
                f"(at most 2^{len(self.ch_mult) - 1})"
            )
        if self.patchify and self.stride != 8:
            raise ValueError("patchify (2×2 latent cells per token) is defined for the stride-8 tokenizer only")
        if self.bits < 1 or self.num_res_blocks < 1:
            raise ValueError(f"bits and num_res_blocks must be positive, got {self.bits}, {self.num_res_blocks}")

    @property
    def num_down(self) -> int:
        return round(math.log2(self.stride))

    @property
    def token_bits(self) -> int:
        """Bits per transformer token."""
        return self.bits * (4 if self.patchify else 1)


# The released tokenizers (REFERENCE §2.1, §6.1). d32reg has d32's layout with other weights.
TOKENIZERS = {
    "d16": TokenizerConfig(bits=16),
    "d24": TokenizerConfig(bits=24),
    "d32": TokenizerConfig(bits=32),
    "d32reg": TokenizerConfig(bits=32),
    "d64": TokenizerConfig(bits=64),
    "d14_f8": TokenizerConfig(bits=14, stride=8, ch_mult=(1, 2, 4, 4), patchify=True),
    # Ours: a narrow stride-16 tokenizer for tests and CPU smoke runs.
    "tiny": TokenizerConfig(bits=16, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1),
}


def get_tokenizer_config(name: str) -> TokenizerConfig:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


def _constrain(x):
    return nn.with_logical_constraint(x, ACT_AXES)


_KERNEL_INIT = nn.with_logical_partitioning(
    nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "conv_out")
)
_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",))

# Which taps of a 3×3 kernel land on which low-resolution row after a nearest ×2 upsampling:
# [output row parity, row of a 2×2 window, row of the 3×3 kernel]. An even output row 2i reads the upsampled rows
# 2i-1, 2i, 2i+1, i.e. input rows i-1 (tap 0) and i (taps 1 and 2); an odd row 2i+1 reads input rows i (taps 0 and
# 1) and i+1 (tap 2). Columns alike.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def nearest_up_conv(x, kernel, bias):
    """A 3×3 conv (padding 1) of x upsampled ×2 by nearest neighbour, without making the upsampled input.

    x: [B, h, w, C_in], kernel: [3, 3, C_in, C_out], bias: [C_out] -> [B, 2h, 2w, C_out], in x's dtype.

    Each output phase (row parity a, column parity b) is a 2×2 conv of x whose taps are sums of the 3×3 taps
    (`_PHASE_TAPS`). One conv over x padded by one computes the four phases as 4·C_out features, and phase (a, b)
    of output pixel (i, j) is read at window (i + a, j + b): 16·C_in·C_out multiply-adds per input pixel instead
    of 36, and no [B, 2h, 2w, C_in] copy written and read again.
    """
    batch, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    # Taps summed in float32 and rounded once to x's dtype, as nn.Conv rounds a kernel once.
    phases = jnp.einsum("ary,bsx,yxcd->rscabd", _PHASE_TAPS, _PHASE_TAPS, kernel.astype(jnp.float32))
    phases = phases.reshape(2, 2, c_in, 4 * c_out).astype(x.dtype)
    # Padded before a VALID conv rather than by the conv: the same forward (XLA folds the pad into the conv), but
    # autodiff then writes the kernel's gradient as a plain valid conv of the padded input, which XLA's CPU backend
    # runs as a library conv; the "full"-padding gradient with a reversed window ran as a naive loop, ~0.4 s a
    # device per step of the tiny tokenizer at -O0.
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(padded, phases, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(batch, h + 1, w + 1, 2, 2, c_out)
    rows = [jnp.stack([y[:, a : a + h, b : b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(batch, 2 * h, 2 * w, c_out) + bias.astype(x.dtype)


class _Weights(nn.Module):
    """A conv's kernel [k, k, in, out] and bias [out], named and initialised as `nn.Conv` names them."""

    features: int
    kernel: int

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", _KERNEL_INIT, (self.kernel, self.kernel, in_features, self.features))
        return kernel, self.param("bias", _BIAS_INIT, (self.features,))


class Conv(nn.Module):
    """A conv with logically named (replicable) weights; `padding` as in flax (pairs allowed). With
    `nearest_up`, the 3×3 conv of the input upsampled ×2 by nearest neighbour (`nearest_up_conv`)."""

    features: int
    kernel: int = 3
    strides: int = 1
    padding: object = 1
    dtype: jnp.dtype = jnp.float32
    nearest_up: bool = False

    @nn.compact
    def __call__(self, x):
        if self.nearest_up:
            kernel, bias = _Weights(self.features, self.kernel, name="conv")(x.shape[-1])
            return nearest_up_conv(x.astype(self.dtype), kernel, bias)
        return nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.strides,
            padding=self.padding,
            dtype=self.dtype,
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            name="conv",
        )(x)


def group_norm(x, scale, bias, groups: int, eps: float = 1e-6):
    """GroupNorm: x [B, H, W, C] normalised over (H, W, C/groups) per group, then scale·x + bias ([C]); float32.

    Mean and variance come from one pass over x, the sums of d = x − s and of d² with s the mean of the group's
    first row: E[d²] − E[d]² does not cancel as E[x²] − E[x]² does where |mean| ≫ std (in float32 it is as exact as
    the two-pass variance), and the decoder's norms at 1024² read their 0.25–0.5 GiB input once for both
    statistics instead of once for the mean and again for the variance.
    """
    b, h, w, c = x.shape
    grouped = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    # Any s gives the same statistics: its gradient is zero, and stopping it spares the backward a term.
    d = grouped - jax.lax.stop_gradient(jnp.mean(grouped[:, :1], axis=(2, 4), keepdims=True))
    mean = jnp.mean(d, axis=(1, 2, 4), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(d), axis=(1, 2, 4), keepdims=True) - jnp.square(mean), 0.0)
    return ((d - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


class _Affine(nn.Module):
    """A norm's scale and bias [C], named and initialised as `nn.GroupNorm` names them."""

    @nn.compact
    def __call__(self, channels: int):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (channels,))
        return scale, self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (channels,))


class Norm(nn.Module):
    """GroupNorm(32, eps 1e-6) with affine parameters (24 groups where 32 do not divide the channels), computed in
    float32 and returned in `dtype`."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        scale, bias = _Affine(name="norm")(channels)
        return group_norm(x, scale, bias, 32 if channels % 32 == 0 else 24).astype(self.dtype)


class ResBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), with a 1×1 shortcut when the width changes."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Conv(self.features, dtype=self.dtype, name="conv1")(nn.swish(Norm(self.dtype, name="norm1")(x)))
        h = Conv(self.features, dtype=self.dtype, name="conv2")(nn.swish(Norm(self.dtype, name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = Conv(self.features, kernel=1, padding=0, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """3×3 stride-2 conv after zero-padding one row/column at the bottom/right only (the official asymmetry)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(x.shape[-1], strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv (computed without the upsampled copy: `nearest_up_conv`)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(x.shape[-1], dtype=self.dtype, nearest_up=True, name="conv")(x)


class Attention(nn.Module):
    """x + proj_out(softmax(q·kᵀ/√C) v) over all positions, q, k, v = 1×1 conv of GroupNorm(x) (one head)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = Conv(3 * c, kernel=1, padding=0, dtype=self.dtype, name="qkv")(Norm(self.dtype, name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3 * c).astype(jnp.float32), 3, axis=-1)
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5, axis=-1)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
        return x + Conv(c, kernel=1, padding=0, dtype=self.dtype, name="proj_out")(out.astype(x.dtype))


class Level(nn.Module):
    """One resolution level: residual blocks (each followed by attention if `attention`), then an optional
    resampling."""

    features: int
    num_blocks: int
    resample: type[nn.Module] | None
    dtype: jnp.dtype = jnp.float32
    attention: bool = False

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_blocks):
            x = ResBlock(self.features, self.dtype, name=f"block_{j}")(x)
            if self.attention:
                x = Attention(self.dtype, name=f"attn_{j}")(x)
        if self.resample is not None:
            x = self.resample(self.dtype, name=self.resample.__name__.lower())(x)
        return _constrain(x)


class Mid(nn.Module):
    """Two residual blocks at the lowest resolution, with attention between them if `attention` (VAR's VQ-VAE;
    none in Infinity's tokenizers)."""

    dtype: jnp.dtype = jnp.float32
    attention: bool = False

    @nn.compact
    def __call__(self, x):
        x = ResBlock(x.shape[-1], self.dtype, name="block_1")(x)
        if self.attention:
            x = Attention(self.dtype, name="attn_1")(x)
        return ResBlock(x.shape[-1], self.dtype, name="block_2")(x)


def _output(features: int, h, dtype):
    """norm_out -> swish -> conv_out, the last layers of the encoder and of the decoder (call inside a module)."""
    return Conv(features, dtype=dtype, name="conv_out")(nn.swish(Norm(dtype, name="norm_out")(h)))


class Encoder(nn.Module):
    """[B, H, W, 3] in [-1, 1] -> [B, H/stride, W/stride, d] raw latent."""

    config: TokenizerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = Conv(c.base_ch, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        last = len(c.ch_mult) - 1
        for i, mult in enumerate(c.ch_mult):
            down = Downsample if i < c.num_down else None
            attend = c.attention and i == last
            h = Level(c.base_ch * mult, c.num_res_blocks, down, self.dtype, attend, name=f"down_{i}")(h)
        h = Mid(self.dtype, c.attention, name="mid")(h)
        return _constrain(_output(c.bits, h, self.dtype).astype(jnp.float32))


class Decoder(nn.Module):
    """[B, h, w, d] latent -> [B, h·stride, w·stride, 3] (not clamped)."""

    config: TokenizerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        c = self.config
        h = Conv(c.base_ch * c.ch_mult[-1], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        h = Mid(self.dtype, c.attention, name="mid")(h)
        last = len(c.ch_mult) - 1
        for i in reversed(range(len(c.ch_mult))):
            up = Upsample if 1 <= i <= c.num_down else None
            attend = c.attention and i == last
            h = Level(c.base_ch * c.ch_mult[i], c.num_res_blocks + 1, up, self.dtype, attend, name=f"up_{i}")(h)
        return _constrain(_output(3, h, self.dtype).astype(jnp.float32))


class BSQVAE(nn.Module):
    """Encoder + decoder; the quantizer between them is `infinity_jax.quantizer` (no parameters)."""

    config: TokenizerConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype)
        self.decoder = Decoder(self.config, self.dtype)

    def encode(self, images):
        """images [B, H, W, 3] in [-1, 1] -> latent [B, H/stride, W/stride, d] float32."""
        return self.encoder(images)

    def decode(self, latent):
        """latent [B, h, w, d] -> images [B, h·stride, w·stride, 3] clamped to [-1, 1]."""
        return jnp.clip(self.decode_unclamped(latent), -1.0, 1.0)

    def decode_unclamped(self, latent):
        """The decoder's raw output, for training losses: a clamp would stop the gradient of out-of-range pixels."""
        return self.decoder(latent)

    def __call__(self, images):
        return self.decode(self.encode(images))


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
