"""The bitwise quantizer: one scale, multi-scale residual quantization, Bitwise Self-Correction."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from infinity_jax import quantizer, schedules
from infinity_jax.ops import area_resize, bilinear_resize

# Jitted once per schedule: eager dispatch of the per-scale loops would compile every op separately.
multiscale = jax.jit(quantizer.multiscale_quantize, static_argnums=(1, 2))
self_correct = jax.jit(quantizer.self_correct, static_argnums=1, static_argnames=("kind", "requant", "patchify"))
bsc = jax.jit(
    quantizer.bitwise_self_correction, static_argnums=1, static_argnames=("strength", "num_flip_scales", "patchify")
)
bits_to_latent = jax.jit(quantizer.bits_to_latent, static_argnums=(1, 2))

S256 = schedules.infinity_schedule(1.0, "0.06M")  # 16x16 latent, 7 scales, L = 521
WIDE = schedules.infinity_schedule(0.5, "0.06M")  # 11x22 latent, non-square, non-divisible grids


def _latent(schedule, batch=2, d=16, seed=0):
    h, w = schedule.grid
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, h, w, d)), jnp.float32)


@pytest.mark.parametrize("kind", ["bsq", "lfq"])
def test_one_scale_codes_bits_and_roundtrip(kind):
    r = _latent(S256, d=32)
    q = quantizer.quantize(r, kind)
    scale = 1 / math.sqrt(32) if kind == "bsq" else 1.0
    np.testing.assert_allclose(np.abs(np.asarray(q.codes)), scale, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.bits), np.asarray(r > 0).astype(np.int32))
    # codes(bits(x)) = q(x), both ways.
    np.testing.assert_allclose(np.asarray(quantizer.bits_to_codes(q.bits, kind)), np.asarray(q.codes), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(quantizer.codes_to_bits(q.codes)), np.asarray(q.bits))
    if kind == "bsq":
        np.testing.assert_allclose(np.linalg.norm(np.asarray(q.codes), axis=-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(q.unit), axis=-1), 1.0, rtol=1e-6)


def test_zero_residual_maps_to_bit_zero():
    q = quantizer.quantize(jnp.zeros((3, 8)))
    assert int(q.bits.sum()) == 0
    np.testing.assert_allclose(np.asarray(q.codes), -1 / math.sqrt(8))


def test_straight_through_gradients():
    r = _latent(S256, d=8)[0]
    g = jnp.asarray(np.random.default_rng(5).standard_normal(r.shape), jnp.float32)
    # LFQ: d sum(g·q)/dr = g exactly.
    grad_lfq = jax.grad(lambda x: jnp.sum(g * quantizer.quantize(x, "lfq").codes))(r)
    np.testing.assert_allclose(np.asarray(grad_lfq), np.asarray(g), atol=1e-7)
    # BSQ: the identity with respect to the normalised input, so the gradient is that of the normalisation.
    grad_bsq = jax.grad(lambda x: jnp.sum(g * quantizer.quantize(x, "bsq").codes))(r)
    grad_norm = jax.grad(lambda x: jnp.sum(g * x / jnp.linalg.norm(x, axis=-1, keepdims=True)))(r)
    np.testing.assert_allclose(np.asarray(grad_bsq), np.asarray(grad_norm), atol=1e-6)
    assert float(jnp.abs(grad_bsq).max()) > 0


def test_multiscale_gradient_is_straight_through():
    """With LFQ, d latent/d z is the linear map z -> Σ_k up(area(z)) (residuals are detached)."""
    z = _latent(WIDE, batch=1, d=4)
    g = jnp.asarray(np.random.default_rng(6).standard_normal(z.shape), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(g * quantizer.multiscale_quantize(x, WIDE, "lfq").latent)))(z)

    def linear(x):
        return sum(bilinear_resize(area_resize(x, hw), WIDE.grid) for hw in WIDE.scales)

    expected = jax.jit(jax.grad(lambda x: jnp.sum(g * linear(x))))(z)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("schedule", [S256, WIDE, schedules.var_schedule(256)])
def test_residual_norm_falls_at_every_scale(schedule):
    """On latents made the way the decoder reads them (random codes at every scale, plus noise), each scale
    explains part of what is left: the relative residual norm falls monotonically."""
    rng = np.random.default_rng(0)
    bits = [jnp.asarray(rng.integers(0, 2, (4, h, w, 32)), jnp.int32) for h, w in schedule.scales]
    noise = 0.01 * rng.standard_normal((4, *schedule.grid, 32))
    z = bits_to_latent(bits, schedule.grid, "bsq") + jnp.asarray(noise, jnp.float32)
    ms = multiscale(z, schedule, "bsq")
    norms = [
        float(jnp.linalg.norm(z - bits_to_latent(ms.bits[:k], schedule.grid, "bsq")) / jnp.linalg.norm(z))
        for k in range(1, schedule.num_scales + 1)
    ]
    assert all(b < a for a, b in itertools.pairwise(norms)) and norms[-1] < 0.3, norms
    # bits_to_latent over all scales is the decoder input.
    np.testing.assert_allclose(
        np.asarray(bits_to_latent(ms.bits, schedule.grid, "bsq")), np.asarray(ms.latent), atol=1e-5
    )
    assert [b.shape[1:3] for b in ms.bits] == list(schedule.scales)


def test_bsc_without_flips_gives_the_plain_labels_and_inputs():
    z = _latent(WIDE, batch=3, d=16)
    ms = multiscale(z, WIDE, "bsq")
    targets = bsc(z, WIDE, jax.random.key(0), strength=0.0)
    np.testing.assert_array_equal(np.asarray(targets.labels), np.asarray(quantizer.flatten_scales(ms.bits)))
    expected_inputs = [
        bilinear_resize(bits_to_latent(ms.bits[: k + 1], WIDE.grid, "bsq"), WIDE.scales[k + 1])
        for k in range(WIDE.num_scales - 1)
    ]
    np.testing.assert_allclose(
        np.asarray(targets.inputs), np.asarray(quantizer.flatten_scales(expected_inputs)), atol=1e-5
    )
    chex.assert_shape(targets.labels, (3, WIDE.num_tokens, 16))
    chex.assert_shape(targets.inputs, (3, WIDE.num_tokens - 1, 16))


@pytest.mark.parametrize("k", [0, 2, 5])
def test_flips_at_scale_k_change_only_later_labels(k):
    z = _latent(S256, batch=2, d=16)
    clean = self_correct(z, S256, [None] * S256.num_scales)
    flips = [None] * S256.num_scales
    h, w = S256.scales[k]
    flips[k] = jax.random.uniform(jax.random.key(1), (2, h, w, 16)) < 0.3
    flipped = self_correct(z, S256, flips)
    starts = S256.offsets
    for j in range(S256.num_scales):
        same = np.array_equal(
            np.asarray(clean.labels[:, starts[j] : starts[j + 1]]),
            np.asarray(flipped.labels[:, starts[j] : starts[j + 1]]),
        )
        assert same == (j <= k), f"scale {j} after flipping scale {k}"
    # Without re-quantization the flips do not reach the reconstruction at all.
    no_requant = self_correct(z, S256, flips, requant=False)
    np.testing.assert_array_equal(np.asarray(no_requant.labels), np.asarray(clean.labels))


def test_flip_probabilities_are_levels_up_to_strength():
    schedule = schedules.infinity_schedule(1.0, "0.25M")
    rates = []
    for seed in range(6):
        masks = quantizer.flip_masks(jax.random.key(seed), 8, schedule, 32, 0.3, num_flip_scales=8)
        assert masks[8] is None and masks[9] is None
        rates += [float(m.mean()) for m in masks[5:8]]  # large scales: the empirical rate is close to p
    assert max(rates) <= 0.31 and len({round(r, 2) for r in rates}) > 3, rates


def test_same_key_and_step_give_the_same_flips():
    z = _latent(S256, batch=2, d=16)
    key = jax.random.key(42)

    def targets(step):
        return bsc(z, S256, jax.random.fold_in(key, step), strength=0.3)

    a, b, c = targets(7), targets(7), targets(8)
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    np.testing.assert_array_equal(np.asarray(a.inputs), np.asarray(b.inputs))
    assert not np.array_equal(np.asarray(a.labels), np.asarray(c.labels))


def test_jit_and_batch_sharded_over_8_devices():
    devices = jax.devices("cpu")
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    z = _latent(WIDE, batch=8, d=16)
    key = jax.random.key(3)

    single = bsc(jax.device_put(z, devices[0]), WIDE, key, strength=0.3)
    sharded_z = jax.device_put(z, NamedSharding(mesh, P("data")))
    out = bsc(sharded_z, WIDE, key, strength=0.3)
    np.testing.assert_array_equal(np.asarray(out.labels), np.asarray(single.labels))
    np.testing.assert_allclose(np.asarray(out.inputs), np.asarray(single.inputs), atol=1e-6)
    assert out.labels.sharding.spec[0] == "data" and len(out.labels.sharding.device_set) == 8
    assert multiscale(sharded_z, WIDE, "bsq").latent.sharding.spec[0] == "data"


def test_patchify_layout():
    schedule = schedules.infinity_schedule(1.333, "0.06M")
    z = _latent(schedule.upsampled(2), batch=2, d=14)
    targets = bsc(z, schedule.upsampled(2), jax.random.key(0), patchify=True)
    chex.assert_shape(targets.labels, (2, schedule.num_tokens, 56))
    chex.assert_shape(targets.inputs, (2, schedule.num_tokens - 1, 56))


def test_entropy_penalty_and_commitment():
    d = 8
    # Confident, balanced bits over all 2^d codes: per-sample entropy ~0, codebook entropy ~ d·ln 2.
    codes = np.array([[1 if (i >> j) & 1 else -1 for j in range(d)] for i in range(2**d)], np.float32)
    penalty, per_sample, codebook = quantizer.entropy_penalty(jnp.asarray(codes / math.sqrt(d)))
    assert float(per_sample) < 1e-3 and abs(float(codebook) - d * math.log(2)) < 1e-3
    assert abs(float(penalty) + d * math.log(2)) < 1e-3
    # Every token the same code: the codebook entropy collapses, the penalty rises.
    _, _, collapsed = quantizer.entropy_penalty(jnp.tile(jnp.asarray(codes[:1] / math.sqrt(d)), (64, 1)))
    assert float(collapsed) < 1e-3
    q = quantizer.quantize(_latent(S256, d=d))
    expected = np.mean((np.asarray(q.unit) - np.asarray(q.codes)) ** 2)
    np.testing.assert_allclose(float(quantizer.commitment_loss(q)), expected, rtol=1e-5)
    grad = jax.grad(lambda r: quantizer.aux_loss(quantizer.quantize(r)))(_latent(S256, d=d))
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_bad_inputs_raise_clear_errors():
    z = _latent(S256, d=16)
    with pytest.raises(ValueError, match=r"must be \[B, H, W, d\].*got shape \(16, 16, 16\)"):
        quantizer.multiscale_quantize(z[0], S256)
    with pytest.raises(ValueError, match="floating point"):
        quantizer.multiscale_quantize(z.astype(jnp.int32), S256)
    with pytest.raises(ValueError, match=r"larger than the latent grid 8x8"):
        quantizer.multiscale_quantize(z[:, :8, :8], S256)
    with pytest.raises(ValueError, match="must equal the latent grid 16x16"):
        quantizer.self_correct(z, S256.prefix(6), [None] * 6)
    with pytest.raises(ValueError, match=r"one flip mask .* 7 scales, 2 masks"):
        quantizer.self_correct(z, S256, [None, None])
    with pytest.raises(ValueError, match=r"flip mask of scale 1 must be \(2, 2, 2, 16\)"):
        quantizer.self_correct(z, S256, [None, jnp.zeros((2, 2, 2, 8), bool)] + [None] * 5)
    with pytest.raises(ValueError, match="bits have 16 channels but the quantizer has d=32"):
        quantizer.bits_to_codes(jnp.zeros((2, 16), jnp.int32), d=32)
    with pytest.raises(ValueError, match="integer or bool"):
        quantizer.bits_to_codes(jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="patchify needs every grid even"):
        quantizer.self_correct(z, S256, [None] * 7, patchify=True)
    with pytest.raises(ValueError, match="unknown quantizer kind 'vq'"):
        quantizer.quantize(z, "vq")
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        quantizer.bitwise_self_correction(z, S256, jax.random.key(0), strength=1.5)
    with pytest.raises(ValueError, match=r"expected \[B, 521, C\]"):
        quantizer.split_scales(jnp.zeros((2, 520, 16)), S256)
