"""Converting official Infinity state dicts: names/shapes of REFERENCE §6.3, both block layouts, loud failures."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax import schedules
from infinity_jax.convert import transformer as convert
from infinity_jax.convert.common import CheckpointMismatchError
from infinity_jax.models.transformer import Infinity, TransformerConfig

TINY = TransformerConfig(depth=2, embed_dim=64, num_heads=2, ffn_dim=256, bits=8, text_dim=256, text_maxlen=16)


def spec_layout(C, depth, heads, ffn, bits, ct5=2048, maxlen=512, chunks=1, flash_scale=False):
    """Official names and shapes, transcribed from the description of the released 2B state dict."""
    pool_heads = ct5 // (128 if C <= 4096 else 64)
    layout = {
        "cfg_uncond": (maxlen, ct5), "pos_start": (1, 1, C), "text_norm.weight": (ct5,),
        "text_proj_for_sos.ca.mat_q": (1, pool_heads, C // pool_heads), "text_proj_for_sos.ca.v_bias": (C,),
        "text_proj_for_sos.ca.zero_k_bias": (C,), "text_proj_for_sos.ca.mat_kv.weight": (2 * C, ct5),
        "text_proj_for_sos.ca.proj.weight": (C, C), "text_proj_for_sos.ca.proj.bias": (C,),
        "text_proj_for_ca.0.weight": (C, ct5), "text_proj_for_ca.0.bias": (C,),
        "text_proj_for_ca.2.weight": (C, C), "text_proj_for_ca.2.bias": (C,),
        "lvl_embed.weight": (15, C), "word_embed.weight": (C, bits), "word_embed.bias": (C,),
        "shared_ada_lin.1.weight": (6 * C, C), "shared_ada_lin.1.bias": (6 * C,),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (2 * bits, C), "head.bias": (2 * bits,),
    }  # fmt: skip
    per_chunk = depth // chunks
    for i in range(depth):
        p = f"block_chunks.{i // per_chunk}.module.{i % per_chunk}." if chunks > 1 else f"blocks.{i}."
        layout.update({
            p + "ada_gss": (1, 1, 6, C), p + "sa.scale_mul_1H11": (1, 1, heads, 1) if flash_scale else (1, heads, 1, 1),
            p + "sa.q_bias": (C,), p + "sa.v_bias": (C,), p + "sa.zero_k_bias": (C,), p + "sa.mat_qkv.weight": (3 * C, C),
            p + "sa.proj.weight": (C, C), p + "sa.proj.bias": (C,), p + "ca.v_bias": (C,), p + "ca.zero_k_bias": (C,),
            p + "ca.mat_q.weight": (C, C), p + "ca.mat_q.bias": (C,), p + "ca.mat_kv.weight": (2 * C, C),
            p + "ca.proj.weight": (C, C), p + "ca.proj.bias": (C,), p + "ffn.fc1.weight": (ffn, C), p + "ffn.fc1.bias": (ffn,),
            p + "ffn.fc2.weight": (C, ffn), p + "ffn.fc2.bias": (C,), p + "ca_norm.weight": (C,), p + "ca_norm.bias": (C,),
        })  # fmt: skip
    return layout


def random_state_dict(layout, seed=0):
    rng = np.random.default_rng(seed)
    return {
        n: np.zeros(s, np.float32) if "zero_k_bias" in n else rng.standard_normal(s).astype(np.float32)
        for n, s in layout.items()
    }


def test_the_2b_and_8b_layouts():
    layout = spec_layout(2048, 32, 16, 8192, 32, chunks=8)
    assert len(layout) == 694  # 22 top-level + 32 blocks × 21 entries, buffers included
    params = {n: s for n, s in layout.items() if "zero_k_bias" not in n}
    assert convert.official_layout(TransformerConfig.from_size("infinity_2b"), block_chunks=8) == params
    assert sum(math.prod(s) for s in params.values()) == 2_204_564_032
    eight = convert.official_layout(TransformerConfig.from_size("infinity_8b", bits=56), block_chunks=8)
    expected = {n: s for n, s in spec_layout(3584, 40, 28, 14336, 56, chunks=8).items() if "zero_k_bias" not in n}
    assert eight == expected and eight["text_proj_for_sos.ca.mat_q"] == (1, 16, 224)


def test_weights_land_where_the_official_model_uses_them():
    layout = spec_layout(64, 2, 2, 256, 8, ct5=256, maxlen=16, chunks=2, flash_scale=True)
    state = random_state_dict(layout)
    params = convert.convert_state_dict(state, TINY)
    block = params["blocks"]["block_1"]
    w = state["block_chunks.1.module.0.sa.mat_qkv.weight"]  # rows: q | k | v, each (heads, head_dim)
    np.testing.assert_array_equal(block["sa"]["qkv"]["kernel"][:, 1, 0], w[64:96].T)  # k of head 0
    np.testing.assert_array_equal(
        block["sa"]["proj"]["kernel"][1], state["block_chunks.1.module.0.sa.proj.weight"][:, 32:].T
    )
    np.testing.assert_array_equal(
        block["sa"]["scale_mul"], state["block_chunks.1.module.0.sa.scale_mul_1H11"].reshape(2)
    )
    head = state["head.weight"]  # output 2j + b is bit j taking value b
    np.testing.assert_array_equal(params["head"]["kernel"][:, 5, 1], head[11])
    np.testing.assert_array_equal(params["head"]["bias"][5], state["head.bias"][10:12])
    ada = state["shared_ada_lin.1.weight"]  # six chunks of C: γ1 γ2 s1 s2 b1 b2
    np.testing.assert_array_equal(params["shared_ada_lin"]["kernel"][:, 3], ada[3 * 64 : 4 * 64].T)
    np.testing.assert_array_equal(params["pos_start"], state["pos_start"][0, 0])
    np.testing.assert_array_equal(params["text_pool"]["query"], state["text_proj_for_sos.ca.mat_q"][0])
    # The same tensors named `blocks.{i}` convert to the same parameters; the scan layout stacks them.
    flat = {
        n.replace("block_chunks.0.module.0.", "blocks.0.").replace("block_chunks.1.module.0.", "blocks.1."): v
        for n, v in state.items()
    }
    jax.tree.map(np.testing.assert_array_equal, convert.convert_state_dict(flat, TINY), params)
    scanned = convert.convert_state_dict(state, TransformerConfig(**{**TINY.__dict__, "scan_blocks": True}))
    np.testing.assert_array_equal(scanned["blocks"]["layers"]["ffn"]["fc1"]["kernel"][1], block["ffn"]["fc1"]["kernel"])
    # A forward pass of the converted model.
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    logits = jax.jit(lambda p: Infinity(TINY).apply(
        {"params": p}, jnp.zeros((1, schedule.num_tokens - 1, 8)), schedule, text=jnp.ones((1, 3, 256)), text_mask=jnp.ones((1, 3), bool)
    ))(params)  # fmt: skip
    assert logits.shape == (1, 521, 8, 2) and bool(jnp.isfinite(logits).all()) and float(jnp.abs(logits).max()) > 1


def test_checkpoint_files(tmp_path):
    torch = pytest.importorskip("torch")
    state = random_state_dict(spec_layout(64, 2, 2, 256, 8, ct5=256, maxlen=16))
    path = tmp_path / "ar-ckpt.pth"
    torch.save({"trainer": {"gpt_fsdp": {n: torch.from_numpy(v) for n, v in state.items()}}, "epoch": 3}, path)
    jax.tree.map(
        np.testing.assert_array_equal, convert.load_official(str(path), TINY), convert.convert_state_dict(state, TINY)
    )


def test_every_missing_unexpected_and_misshapen_entry_is_reported():
    state = random_state_dict(spec_layout(64, 3, 2, 256, 8, ct5=256, maxlen=16))  # one block too many
    del state["head.bias"], state["blocks.1.ffn.fc2.weight"]
    state["blocks.0.sa.mat_qkv.weight"] = state["blocks.0.sa.mat_qkv.weight"].T.copy()  # same size, wrong layout
    state["word_embed.weight"] = np.zeros((64, 16), np.float32)  # a 16-bit checkpoint for an 8-bit model
    with pytest.raises(CheckpointMismatchError) as error:
        convert.convert_state_dict(state, TINY)
    e = error.value
    assert e.missing == ["blocks.1.ffn.fc2.weight", "head.bias"]
    assert len(e.unexpected) == 19 and all(n.startswith("blocks.2.") for n in e.unexpected)  # zero_k_bias skipped
    assert [m.split(":")[0] for m in e.misshapen] == ["blocks.0.sa.mat_qkv.weight", "word_embed.weight"]
    assert "(64, 192) converts to (64, 192), model blocks/block_0/sa/qkv/kernel needs (64, 3, 2, 32)" in e.misshapen[0]
