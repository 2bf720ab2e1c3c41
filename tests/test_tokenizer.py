"""The BSQ-VAE tokenizer: layout, shapes for every template, the shared API, sharding, bad input."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from infinity_jax import quantizer, schedules, sharding
from infinity_jax.models.bsq_vae import (
    BSQVAE,
    TOKENIZERS,
    TokenizerConfig,
    count_params,
    group_norm,
    nearest_up_conv,
)
from infinity_jax.tokenizer import Tokenizer

TINY = TokenizerConfig(bits=8, stride=16, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
TINY_F8 = TokenizerConfig(bits=4, stride=8, base_ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, patchify=True)
SMALL = schedules.Schedule(((1, 1), (2, 2), (4, 4)), name="64px")  # 64×64 images


def _images(height, width, batch=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)), jnp.float32)


def _abstract(config):
    return jax.eval_shape(BSQVAE(config).init, jax.random.key(0), jnp.zeros((1, config.stride, config.stride, 3)))


def test_parameter_counts_of_the_released_layouts():
    assert count_params(_abstract(TOKENIZERS["d32"])["params"]) == 110_118_051
    assert count_params(_abstract(TOKENIZERS["d14_f8"])["params"]) == 81_624_209
    # d only changes the encoder's last and the decoder's first conv: 3·3·512 + 1 weights per bit.
    d16, d64 = (count_params(_abstract(TOKENIZERS[n])["params"]) for n in ("d16", "d64"))
    assert d64 - d16 == 48 * (2 * 9 * 512 + 1)


@pytest.mark.parametrize("template", schedules.H_DIV_W_TEMPLATES)
def test_shapes_for_every_template(template):
    """decode(encode(x)) keeps the input's shape (shapes only: the real d32 layout, no arithmetic)."""
    tok = Tokenizer(params=_abstract(TOKENIZERS["d32"])["params"], config=TOKENIZERS["d32"])
    schedule = schedules.infinity_schedule(template, "0.06M")
    images = jax.ShapeDtypeStruct((2, *schedule.pixel_size, 3), jnp.float32)
    latent = jax.eval_shape(Tokenizer.encode, tok, images)
    assert latent.shape == (2, *schedule.grid, 32)
    assert (
        jax.eval_shape(functools.partial(Tokenizer.reconstruct, schedule=schedule), tok, images).shape == images.shape
    )


def test_shapes_at_1024_and_for_the_patchified_8b_tokenizer():
    d32 = Tokenizer(params=_abstract(TOKENIZERS["d32"])["params"], config=TOKENIZERS["d32"])
    assert jax.eval_shape(Tokenizer.encode, d32, jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)).shape == (
        1, 64, 64, 32,
    )  # fmt: skip
    wide = schedules.schedule_for_image(512, 1024, "0.25M")  # h/w 0.5 -> 368x736 pixels, 23x46 tokens
    assert wide.pixel_size == (368, 736)
    assert jax.eval_shape(Tokenizer.encode, d32, jax.ShapeDtypeStruct((1, 368, 736, 3), jnp.float32)).shape[1:3] == (
        23,
        46,
    )
    f8 = Tokenizer(params=_abstract(TOKENIZERS["d14_f8"])["params"], config=TOKENIZERS["d14_f8"])
    schedule = schedules.infinity_schedule(1.0, "1M")
    images = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
    assert jax.eval_shape(Tokenizer.encode, f8, images).shape == (1, 128, 128, 14)
    bits = jax.eval_shape(functools.partial(Tokenizer.tokenize, schedule=schedule), f8, images)
    assert [b.shape for b in bits] == [(1, h, w, 56) for h, w in schedule.scales]


def test_api_roundtrips_on_a_tiny_tokenizer():
    tok = Tokenizer.init(TINY, jax.random.key(1))
    images = _images(64, 64)
    latent = jax.jit(Tokenizer.encode)(tok, images)
    chex.assert_shape(latent, (2, 4, 4, 8))
    bits = jax.jit(Tokenizer.tokenize, static_argnums=2)(tok, images, SMALL)
    assert [b.shape for b in bits] == [(2, 1, 1, 8), (2, 2, 2, 8), (2, 4, 4, 8)]
    assert all(b.dtype == jnp.int32 and set(np.unique(np.asarray(b))) <= {0, 1} for b in bits)
    # Decoding the bits is the reconstruction: both decode the same multi-scale latent.
    from_bits = jax.jit(Tokenizer.decode_bits, static_argnums=2)(tok, bits, SMALL)
    recon = jax.jit(Tokenizer.reconstruct, static_argnums=2)(tok, images, SMALL)
    np.testing.assert_allclose(np.asarray(from_bits), np.asarray(recon), atol=1e-5)
    assert recon.shape == images.shape and float(jnp.abs(recon).max()) <= 1.0
    direct = jax.jit(Tokenizer.decode_latent)(tok, quantizer.multiscale_quantize(latent, SMALL).latent)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(recon), atol=1e-5)


def test_patchified_tokenizer_bits_are_transformer_tokens():
    tok = Tokenizer.init(TINY_F8, jax.random.key(2))
    images = _images(64, 64)
    bits = jax.jit(Tokenizer.tokenize, static_argnums=2)(tok, images, SMALL)  # latent 8x8, tokens 4x4
    assert [b.shape for b in bits] == [(2, 1, 1, 16), (2, 2, 2, 16), (2, 4, 4, 16)]
    recon = jax.jit(Tokenizer.reconstruct, static_argnums=2)(tok, images, SMALL)
    np.testing.assert_allclose(np.asarray(tok.decode_bits(bits, SMALL)), np.asarray(recon), atol=1e-5)


def test_bf16_compute_stays_close_to_float32():
    tok = Tokenizer.init(TINY, jax.random.key(3))
    images = _images(64, 64)
    f32 = jax.jit(Tokenizer.encode)(tok, images)
    bf16 = jax.jit(Tokenizer.encode)(tok.replace(dtype=jnp.bfloat16), images)
    assert bf16.dtype == jnp.float32
    assert float(jnp.abs(bf16 - f32).max() / jnp.abs(f32).max()) < 0.05


def test_upsampling_conv_in_bf16_rounds_no_worse_than_convolving_the_upsampled_copy():
    # nearest_up_conv sums 3×3 taps into 2×2 phase kernels; rounding the sums once keeps bf16 as accurate as the
    # plain conv of the materialised upsampled input (the f32 equality is checked against torch in
    # test_convert_tokenizer).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 12, 64)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 64, 48)) / 24).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    upsampled = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)

    def conv(lhs, rhs, **kw):
        return jax.lax.conv_general_dilated(
            lhs, rhs, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw
        )

    exact = conv(upsampled, kernel, precision="highest") + bias
    plain = conv(upsampled.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)) + bias.astype(jnp.bfloat16)
    ours = nearest_up_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel), jnp.asarray(bias))
    assert ours.shape == (2, 32, 24, 48) and ours.dtype == jnp.bfloat16
    err_plain = float(jnp.abs(plain.astype(jnp.float32) - exact).mean())
    err_ours = float(jnp.abs(ours.astype(jnp.float32) - exact).mean())
    assert err_ours < 1.05 * err_plain, (err_ours, err_plain)
    np.testing.assert_allclose(nearest_up_conv(x, kernel, bias), exact, atol=2e-5)


def test_upsampling_conv_has_the_gradients_of_convolving_the_upsampled_copy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 6, 16)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 16, 8)) / 12).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    weights = rng.standard_normal((2, 16, 12, 8)).astype(np.float32)  # a loss that weighs every output differently

    def plain(x, kernel, bias):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        return jnp.sum((y + bias) * weights)

    expected = jax.grad(plain, argnums=(0, 1, 2))(x, kernel, bias)
    ours = jax.grad(lambda *a: jnp.sum(nearest_up_conv(*a) * weights), argnums=(0, 1, 2))(x, kernel, bias)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_one_pass_group_norm_is_as_exact_as_two_passes_and_has_their_gradient():
    # Activations far from zero (mean 300, std 1): E[x²] − E[x]² in float32 loses the variance, while the shifted
    # one-pass sums of group_norm must stay as close to float64 as flax's two-pass GroupNorm.
    rng = np.random.default_rng(0)
    x = (300.0 + rng.standard_normal((2, 24, 20, 64))).astype(np.float32)
    scale, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    grouped = x.astype(np.float64).reshape(2, 24, 20, 32, 2)
    mean, var = grouped.mean(axis=(1, 2, 4), keepdims=True), grouped.var(axis=(1, 2, 4), keepdims=True)
    exact = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    two_pass = float(np.abs(np.asarray(flax_norm.apply(params, x)) - exact).max())
    ours = float(np.abs(np.asarray(group_norm(jnp.asarray(x), scale, bias, 32)) - exact).max())
    fast = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=True)
    cancelled = float(np.abs(np.asarray(fast.apply(params, x)) - exact).max())
    assert ours < min(1e-4, 2 * two_pass) and cancelled > 100 * ours, (ours, two_pass, cancelled)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    grad_ours = jax.grad(lambda x: jnp.sum(group_norm(x, scale, bias, 32) * weights))(jnp.asarray(x))
    grad_flax = jax.grad(lambda x: jnp.sum(flax_norm.apply(params, x) * weights))(jnp.asarray(x))
    np.testing.assert_allclose(grad_ours, grad_flax, rtol=1e-3, atol=1e-3)


def test_batch_sharded_with_replicated_weights():
    tok = Tokenizer.init(TINY, jax.random.key(4))
    mesh = sharding.make_mesh(data=4, fsdp=2, devices=jax.devices("cpu"))
    weights = sharding.logical_shardings(_abstract(TINY)["params"], mesh, sharding.TOKENIZER_RULES)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(weights))
    images = jax.device_put(_images(64, 64, batch=8), NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.TOKENIZER_RULES):
        latent = jax.jit(Tokenizer.encode)(jax.device_put(tok, NamedSharding(mesh, P())), images)
    assert latent.sharding.spec[0] == ("data", "fsdp") and len(latent.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(latent), np.asarray(jax.jit(Tokenizer.encode)(tok, images)), atol=1e-5)


def test_bad_input_raises_clear_errors():
    tok = Tokenizer.init(TINY, jax.random.key(5))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*got shape \(2, 64, 64, 4\)"):
        tok.encode(jnp.zeros((2, 64, 64, 4)))
    with pytest.raises(ValueError, match="not divisible by the tokenizer stride 16"):
        tok.encode(jnp.zeros((2, 64, 72, 3)))
    with pytest.raises(ValueError, match="floating point in \\[-1, 1\\], got uint8"):
        tok.encode(jnp.zeros((2, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="contain NaN"):
        tok.encode(jnp.full((1, 64, 64, 3), jnp.nan))
    with pytest.raises(ValueError, match=r"images of 128x64 do not fit schedule 64px \(which needs 64x64\)"):
        tok.tokenize(jnp.zeros((1, 128, 64, 3)), SMALL)
    with pytest.raises(ValueError, match=r"bits of a 2x2 scale must be \[B, 2, 2, 8\]"):
        tok.decode_bits([jnp.zeros((1, 1, 1, 8), jnp.int32), jnp.zeros((1, 2, 2, 4), jnp.int32), None], SMALL)
    with pytest.raises(ValueError, match=r"latent must be \[B, h, w, 8\]"):
        tok.decode_latent(jnp.zeros((1, 4, 4, 7)))
    with pytest.raises(ValueError, match="power of two"):
        TokenizerConfig(stride=12)
    with pytest.raises(ValueError, match="unknown tokenizer 'd48'"):
        from infinity_jax.models.bsq_vae import get_tokenizer_config

        get_tokenizer_config("d48")
