"""ops.layer_matmul: one layer's product read from a stack of kernels, on CPU in Pallas' interpret mode."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_transformer import SQUARE, TINY, assert_generations_agree, conditioning, random_params

from infinity_jax.flops import count_flops
from infinity_jax.generate import for_inference
from infinity_jax.ops.layer_matmul import MAX_ROWS, LayerKernel, layer_matmul, tiles


@pytest.mark.parametrize("m", [1, 2, 17, 72])
def test_each_layer_of_the_stack_against_float64(m):
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 64)).astype(np.float32)
    w = rng.standard_normal((3, 64, 96)).astype(np.float32)
    product = jax.jit(lambda x, w, layer: layer_matmul(x, w, layer, tile=(16, 32, 16), interpret=True))
    for layer in range(3):
        y = np.asarray(product(x, w, jnp.int32(layer)))
        np.testing.assert_allclose(y, x.astype(np.float64) @ w[layer], rtol=1e-5, atol=1e-4)
    # As a scan's index, the way generation uses it.
    scanned = jax.lax.scan(lambda c, i: (c, product(x, w, i)), None, jnp.arange(3))[1]
    np.testing.assert_allclose(np.asarray(scanned), np.einsum("mk,lkn->lmn", x.astype(np.float64), w), atol=1e-4)


def test_tiles_divide_the_shapes_and_bad_operands_are_refused():
    for m, k, n in [(2, 2048, 6144), (512, 8192, 2048), (8, 64, 96), (300, 48, 80)]:
        bm, bn, bk = tiles(m, k, n)
        assert n % bn == 0 and k % bk == 0 and min(bm, bn, bk) >= 16, (m, k, n)
    x, w = jnp.ones((4, 64), jnp.bfloat16), jnp.ones((2, 64, 32), jnp.float32)
    with pytest.raises(ValueError, match="does not match"):
        layer_matmul(x, w, jnp.int32(0), interpret=True)
    with pytest.raises(ValueError, match="does not divide"):
        layer_matmul(x, w.astype(jnp.bfloat16), jnp.int32(0), tile=(16, 64, 16), interpret=True)


def test_layer_kernel_contracts_multi_axis_kernels():
    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((2, 4, 16, 64)), jnp.float32)  # [L, H, hd, C]: an output projection
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32)  # [B, n, H, hd]
    kernel = LayerKernel(stack, jnp.int32(1), interpret=True)
    assert kernel.shape == (4, 16, 64)
    y = kernel.matmul(x, in_dims=2)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bnhd,hdc->bnc", x, stack[1]), rtol=1e-5, atol=1e-4)
    # Past MAX_ROWS rows the product is XLA's dot of the slice, with the same result.
    many = jnp.asarray(rng.standard_normal((2, MAX_ROWS // 2 + 1, 4, 16)), jnp.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: kernel.matmul(x, 2))(many))
    want = np.einsum("bnhd,hdc->bnc", many, stack[1])
    np.testing.assert_allclose(np.asarray(kernel.matmul(many, 2)), want, rtol=1e-5, atol=1e-4)


def test_flop_count_includes_the_kernel():
    x, w = jnp.ones((8, 64), jnp.bfloat16), jnp.ones((2, 64, 32), jnp.bfloat16)
    assert count_flops(lambda x, w: layer_matmul(x, w, jnp.int32(0), interpret=True), x, w) == 2 * 8 * 64 * 32


def test_generation_with_weights_read_in_place_equals_sliced_weights():
    from infinity_jax.convert.transformer import stack_blocks

    scanned = dataclasses.replace(TINY, dtype="bfloat16", scan_blocks=True)
    params, sliced = for_inference(stack_blocks(random_params(TINY), TINY.depth), scanned)
    assert_generations_agree(params, sliced, dataclasses.replace(sliced, layer_weights="in_place_interpret"))


def first_scale(layer_weights: str):
    """(params, fn): the blocks of the tiny model's first generation scale, with the given layer weights."""
    from infinity_jax.convert.transformer import stack_blocks
    from infinity_jax.models.transformer import Infinity, init_cache

    scanned = dataclasses.replace(TINY, dtype="bfloat16", scan_blocks=True, layer_weights=layer_weights)
    params, config = for_inference(stack_blocks(random_params(TINY), TINY.depth), scanned)
    model, cond = Infinity(config), conditioning(TINY)

    def fn(params):
        apply = lambda *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731
        condition = apply(cond["text"], cond["text_mask"], None, None, method=Infinity.condition)
        x = apply(condition.cond, method=Infinity.sos)
        return apply(x, condition, SQUARE, 0, init_cache(config, 2, SQUARE), method=Infinity.step)

    return params, fn


@pytest.mark.parametrize("layer_weights", ["slice", "in_place_interpret"])
def test_only_the_in_place_layout_runs_the_kernel(layer_weights):
    params, fn = first_scale(layer_weights)
    jaxpr = str(jax.make_jaxpr(fn)(params))
    assert ("pallas_call" in jaxpr) == (layer_weights != "slice")


def test_in_place_generation_lowers_to_triton_for_a_cuda_target():
    # What `for_inference` picks on a Hopper GPU, lowered (not compiled) on CPU: each of the block's seven dense
    # layers (qkv, proj, ca.q, ca.kv, ca.proj, fc1, fc2) is a call of a Triton kernel in the scan's body.
    params, fn = first_scale("in_place")
    text = jax.jit(fn).trace(params).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    assert len(re.findall(r"call @layer_matmul(_\d+)?\(", text)) == 7


def test_in_place_weights_need_the_inference_layout():
    with pytest.raises(ValueError, match="needs scanned blocks in bfloat16"):
        dataclasses.replace(TINY, layer_weights="in_place")
    with pytest.raises(ValueError, match="unknown layer_weights"):
        dataclasses.replace(TINY, dtype="bfloat16", scan_blocks=True, layer_weights="inplace")
