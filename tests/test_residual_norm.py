"""ops.residual_norm: the gated residual and a LayerNorm in one pass, on CPU in Pallas' interpret mode."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer import SQUARE, TINY, assert_generations_agree, conditioning, random_params

from infinity_jax.models.layers import LN_EPS
from infinity_jax.ops.residual_norm import residual_norm


@pytest.mark.parametrize("n", [1, 5, 12])  # one row per program (n not a multiple of 4) and four
def test_residual_and_norm_against_float64(n):
    rng = np.random.default_rng(n)
    b, c = 2, 128
    x = (3 * rng.standard_normal((b, n, c)) + 1).astype(np.float32)
    branch = rng.standard_normal((b, n, c)).astype(np.float32)
    gate = rng.standard_normal((b, 1, c)).astype(np.float32)  # per batch element, as AdaLN's
    mul, add = rng.standard_normal((2, c)).astype(np.float32)  # shared, as an affine LayerNorm's
    x_new, h = residual_norm(x, branch, gate, mul, add, eps=LN_EPS, out_dtype=jnp.float32, interpret=True)
    want = x.astype(np.float64) + branch * gate.astype(np.float64)
    centred = want - want.mean(-1, keepdims=True)
    normed = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + LN_EPS) * mul + add
    np.testing.assert_allclose(np.asarray(x_new), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), normed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be float32 and match branch"):
        residual_norm(x.astype(jnp.bfloat16), branch, gate, mul, add, eps=LN_EPS, interpret=True)
    with pytest.raises(ValueError, match="96 channels are not a power of two"):
        residual_norm(x[..., :96], branch[..., :96], gate[..., :96], mul[:96], add[:96], eps=LN_EPS, interpret=True)


def test_generation_with_the_one_pass_kernels_equals_xlas():
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    # Both kernels (this one and ops.qkv_cache) in the tiny model's generation against XLA's passes.
    assert_generations_agree(
        random_params(TINY), bf16, dataclasses.replace(bf16, generation_kernels="pallas_interpret")
    )


def _first_scale(model, params, cond):
    """The blocks of the first generation scale of `model`, [B, 1, C]."""
    from infinity_jax.models.transformer import Infinity, init_cache

    apply = lambda *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731
    condition = apply(cond["text"], cond["text_mask"], None, None, method=Infinity.condition)
    x = apply(condition.cond, method=Infinity.sos)
    return apply(x, condition, SQUARE, 0, init_cache(model.config, 2, SQUARE), method=Infinity.step)


def test_the_kernel_runs_in_generation_only_and_lowers_to_triton_for_a_cuda_target():
    from infinity_jax.models.transformer import Infinity

    config = dataclasses.replace(TINY, dtype="bfloat16", generation_kernels="pallas")
    params, cond = random_params(TINY), conditioning(TINY)
    model = Infinity(config)
    text = jax.jit(lambda p: _first_scale(model, p, cond)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
    for kernel in ("residual_norm", "qkv_into_cache"):  # one of each per block
        assert len(re.findall(rf"call @{kernel}(_\d+)?\(", text)) == TINY.depth, kernel
    inputs = jnp.zeros((2, SQUARE.num_tokens - 1, TINY.bits))
    training = jax.make_jaxpr(lambda p: model.apply({"params": p}, inputs, SQUARE, **cond))(params)
    assert "pallas_call" not in str(training)
    # A width Triton's power-of-two tiles do not fit (as 8B's 3584) keeps XLA's passes.
    odd = dataclasses.replace(config, embed_dim=96, ffn_dim=384)
    params96 = random_params(dataclasses.replace(TINY, embed_dim=96, ffn_dim=384))
    first = jax.make_jaxpr(lambda p: _first_scale(Infinity(odd), p, cond))(params96)
    assert "pallas_call" not in str(first)
    with pytest.raises(ValueError, match="unknown generation_kernels 'triton'"):
        dataclasses.replace(TINY, generation_kernels="triton")
