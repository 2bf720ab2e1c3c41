"""VAR: the released layouts' names and shapes, conversion both ways, loud mismatches, the VQ-VAE's multi-scale
quantization and the class-conditional sampler (its parity with the official code is tests/parity/test_official_var.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax import schedules
from infinity_jax.convert import transformer as convert_transformer
from infinity_jax.convert import vqvae as convert_vqvae
from infinity_jax.convert.common import CheckpointMismatchError
from infinity_jax.generate_var import filter_logits, generate_var, var_guidance
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.models.vqvae import VQVAES, VQTokenizer, phi_index

SCHEDULE = schedules.var_schedule((1, 2, 3, 4))  # 30 tokens: small, and every shared φ is used
TINY = TransformerConfig(
    depth=2, embed_dim=64, num_heads=2, ffn_dim=256, bits=8, cond="class", shared_aln=False, positions="absolute",
    num_positions=SCHEDULE.num_tokens, num_levels=SCHEDULE.num_scales, vocab=64, num_classes=10,
)  # fmt: skip
TINY_VQ = VQVAES["tiny"]


def _random_state(layout, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) * 0.1 for n, s in layout.items()}


def test_released_var_layouts_have_the_official_names_and_shapes():
    """Facts read off the official VAR (built from its code): d16 at 256² has 202 parameters (+ 18 buffers) and
    310,283,520 weights; d36 at 512² has shared AdaLN, 408 parameters (+ 38 buffers), 2,353,893,904 weights."""
    d16 = convert_transformer.official_layout(TransformerConfig.from_size("var_d16", schedules.var_schedule(256)))
    assert len(d16) == 202 and sum(math.prod(s) for s in d16.values()) == 310_283_520
    expected = {
        "pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024), "word_embed.weight": (1024, 32),
        "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024), "head_nm.ada_lin.1.weight": (2048, 1024),
        "head.weight": (4096, 1024), "head.bias": (4096,), "blocks.15.attn.scale_mul_1H11": (1, 16, 1, 1),
        "blocks.0.attn.mat_qkv.weight": (3072, 1024), "blocks.0.attn.q_bias": (1024,),
        "blocks.0.attn.proj.weight": (1024, 1024), "blocks.0.ffn.fc1.weight": (4096, 1024),
        "blocks.0.ada_lin.1.weight": (6144, 1024), "blocks.0.ada_lin.1.bias": (6144,),
    }  # fmt: skip
    assert {n: d16[n] for n in expected} == expected
    d36 = convert_transformer.official_layout(TransformerConfig.from_size("var_d36", schedules.var_schedule(512)))
    assert len(d36) == 408 and sum(math.prod(s) for s in d36.values()) == 2_353_893_904
    assert d36["shared_ada_lin.1.weight"] == (13824, 2304) and d36["blocks.35.ada_gss"] == (1, 1, 6, 2304)
    assert d36["pos_1LC"] == (1, 2240, 2304) and "blocks.0.ada_lin.1.weight" not in d36


def test_released_vqvae_layout_converts_with_every_name_and_shape():
    """vae_ch160v4096z32: 323 parameters (+ the usage buffer), 108,948,355 weights, as the official VQVAE."""
    config = VQVAES["vae_ch160v4096z32"]
    layout = convert_vqvae.official_layout(config)
    assert len(layout) == 323 and sum(math.prod(s) for s in layout.values()) == 108_948_355
    expected = {
        "encoder.conv_in.weight": (160, 3, 3, 3), "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.0.proj_out.bias": (640,), "encoder.mid.attn_1.norm.weight": (640,),
        "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1), "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "quant_conv.weight": (32, 32, 3, 3), "post_quant_conv.bias": (32,), "quantize.embedding.weight": (4096, 32),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3), "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
    }  # fmt: skip
    assert {n: layout[n] for n in expected} == expected
    state = {n: np.broadcast_to(np.float32(0), s) for n, s in layout.items()}  # zero strides: no 436 MB
    state[convert_vqvae.BUFFER] = np.zeros((10, 4096), np.float32)
    params = convert_vqvae.convert_state_dict(state, config)
    assert params["quantize"]["phis_3"]["conv"]["kernel"].shape == (3, 3, 32, 32)
    assert params["encoder"]["down_4"]["attn_1"]["qkv"]["conv"]["kernel"].shape == (1, 1, 640, 1920)
    assert convert_vqvae.infer_config(state) == config


def test_var_round_trip_and_forward():
    state = _random_state(convert_transformer.official_layout(TINY))
    params = convert_transformer.convert_state_dict(state, TINY)
    assert convert_transformer.infer_config(state) == TINY
    exported = convert_transformer.export_state_dict(params, TINY, schedule=SCHEDULE)
    buffers = {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"}
    assert set(exported) == set(state) | buffers
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    mask = exported["attn_bias_for_masking"][0, 0]
    assert mask[1, 0] == 0 and mask[0, 1] == -np.inf and mask[2, 1] == 0 and mask[5, 5] == 0  # block-causal
    labels = jnp.array([1, 9])
    inputs = jnp.asarray(np.random.default_rng(1).standard_normal((2, SCHEDULE.num_tokens - 1, 8)), jnp.float32)
    logits = Infinity(TINY).apply({"params": params}, inputs, SCHEDULE, labels=labels)
    assert logits.shape == (2, SCHEDULE.num_tokens, 64) and np.isfinite(np.asarray(logits)).all()
    # The absolute table matters: moving one position row changes exactly that token's logits first.
    moved = {**params, "pos_1LC": params["pos_1LC"].copy()}
    moved["pos_1LC"][3] += 1.0
    changed = np.abs(np.asarray(Infinity(TINY).apply({"params": moved}, inputs, SCHEDULE, labels=labels) - logits))
    assert changed[:, :1].max() == 0 and changed[:, 3].max() > 0  # token 0 (scale 1) cannot see token 3 (scale 2)


def test_var_mismatches_name_every_key():
    layout = convert_transformer.official_layout(TINY)
    state = _random_state(layout)
    del state["blocks.1.attn.q_bias"]
    state["blocks.1.attn.extra"] = np.zeros(3, np.float32)
    state["pos_1LC"] = np.zeros((1, 31, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_transformer.convert_state_dict(state, TINY)
    message = str(error.value)
    assert "blocks.1.attn.q_bias" in message and "blocks.1.attn.extra" in message and "pos_1LC: (1, 31, 64)" in message
    vq_state = _random_state(convert_vqvae.official_layout(TINY_VQ))
    del vq_state["quantize.quant_resi.qresi_ls.2.bias"]
    vq_state["encoder.mid.attn_1.qkv.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_vqvae.convert_state_dict(vq_state, TINY_VQ)
    assert "quantize.quant_resi.qresi_ls.2.bias" in str(error.value) and "attn_1.qkv.weight: (3, 3)" in str(error.value)


@pytest.fixture(scope="module")
def vq():
    state = _random_state(convert_vqvae.official_layout(TINY_VQ), seed=2)
    state["quantize.embedding.weight"] *= 10.0
    return VQTokenizer(convert_vqvae.convert_state_dict(state, TINY_VQ), TINY_VQ), state


def test_vqvae_round_trip_and_multiscale_quantization(vq):
    tokenizer, state = vq
    exported = convert_vqvae.export_state_dict(tokenizer.params, TINY_VQ, SCHEDULE)
    assert set(exported) == set(state) | {convert_vqvae.BUFFER}
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    indices = jax.jit(VQTokenizer.tokenize, static_argnums=2)(tokenizer, images, SCHEDULE)
    assert [i.shape for i in indices] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 4, 4)]
    # The last scale picks, per cell, the entry nearest to what the coarser scales left.
    f = tokenizer.encode(images)
    f_hat = jnp.zeros_like(f)
    for k in range(3):
        f_hat = tokenizer.add_scale(f_hat, tokenizer.lookup(indices[k]), k, SCHEDULE)
    rest = np.asarray(f - f_hat).reshape(-1, TINY_VQ.dim)
    codebook = np.asarray(tokenizer.params["quantize"]["embedding"])
    nearest = np.argmin(((rest[:, None] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(indices[3]).reshape(-1), nearest)
    recon = jax.jit(VQTokenizer.reconstruct, static_argnums=2)(tokenizer, images, SCHEDULE)
    decoded = jax.jit(VQTokenizer.decode_indices, static_argnums=2)(tokenizer, indices, SCHEDULE)
    np.testing.assert_allclose(np.asarray(recon), np.asarray(decoded), atol=1e-6)
    assert recon.shape == images.shape and float(jnp.abs(recon).max()) <= 1.0


def test_shared_phis_follow_the_scale_ratio():
    # Ticks linspace(1/12, 11/12, 4) = 3/36, 13/36, 23/36, 33/36 against k/9: k = 2 (8/36) and k = 7 (28/36) sit
    # halfway between two ticks, and the float rounding of the official numpy expression gives the upper one.
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]


def test_filter_logits_known_values():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 0.0)) == [False, True, False, True]
    assert kept(filter_logits(logits, 0, 0.65)) == [False, True, False, True]  # 0.1 + 0.2 <= 0.35 removed
    assert kept(filter_logits(logits, 0, 0.05)) == [False, True, False, False]  # only the largest
    assert kept(filter_logits(logits, 0, 0.0)) == [True] * 4
    assert kept(filter_logits(logits, 1, 0.9)) == [False, True, False, False]
    np.testing.assert_allclose(var_guidance(1.5, 4), [1.0, 1.5, 2.0, 2.5])


def test_generation_is_reproducible_teacher_forced_and_greedy(vq):
    tokenizer, _ = vq
    params = convert_transformer.convert_state_dict(_random_state(convert_transformer.official_layout(TINY), 4), TINY)
    labels = np.array([0, 5])

    def run(seed, **kwargs):
        return generate_var(params, TINY, tokenizer, SCHEDULE, jax.random.key(seed), labels=labels, **kwargs)

    a, b, c = run(0), run(0), run(1)
    assert a.images.shape == (2, 64, 64, 3) and a.f_hat.shape == (2, 4, 4, TINY_VQ.dim)
    for x, y in zip(a.indices, b.indices, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.indices, c.indices, strict=True))
    teacher = [jnp.zeros((2, 1, 1), jnp.int32), jnp.full((2, 2, 2), 7, jnp.int32)]
    forced = run(1, teacher_indices=teacher)
    np.testing.assert_array_equal(forced.indices[1], teacher[1])
    greedy = [run(seed, top_k=1).indices for seed in (0, 1)]
    for x, y in zip(*greedy, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="cfg must be a number or a list of 4"):
        run(0, cfg=[1.0, 2.0])
    with pytest.raises(ValueError, match="class ids"):
        generate_var(params, TINY, tokenizer, SCHEDULE, jax.random.key(0), labels=np.array([10]))
