"""The FLOP counter against hand counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from infinity_jax.flops import count_flops
from infinity_jax.models.bsq_vae import BSQVAE, TOKENIZERS
from infinity_jax.tokenizer import Tokenizer


def _s(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_products_scans_and_conditionals():
    assert count_flops(jnp.matmul, _s(64, 128), _s(128, 32)) == 2 * 64 * 128 * 32
    assert count_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), _s(3, 4, 5), _s(3, 5, 6)) == 2 * 3 * 4 * 5 * 6

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert count_flops(conv, _s(2, 16, 16, 8), _s(3, 3, 8, 4)) == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 8)

    def scanned(a):
        return jax.lax.scan(lambda c, _: (c @ jnp.ones((128, 128)), None), a, None, length=5)[0]

    assert count_flops(scanned, _s(64, 128)) == 5 * 2 * 64 * 128 * 128

    def branchy(p, a):
        return jax.lax.cond(p, lambda x: x @ jnp.ones((128, 256)), lambda x: jnp.zeros((64, 256)), a)

    assert count_flops(branchy, jax.ShapeDtypeStruct((), bool), _s(64, 128)) == 2 * 64 * 128 * 256
    assert count_flops(jax.jit(lambda a: jnp.tanh(a) @ a.T), _s(8, 4)) == 2 * 8 * 4 * 8  # through jit, no elementwise


def test_tokenizer_encoder_flops_match_a_hand_count():
    """d32 encoder at 256²: each 3×3 conv costs 2·H·W·9·Cin·Cout; summed level by level."""
    config = TOKENIZERS["d32"]
    params = jax.eval_shape(BSQVAE(config).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    tok = Tokenizer(nn.unbox(params), config)

    def conv(size, cin, cout, k=3):
        return 2 * size * size * k * k * cin * cout

    def resblock(size, cin, cout):
        return conv(size, cin, cout) + conv(size, cout, cout) + (conv(size, cin, cout, 1) if cin != cout else 0)

    expected = conv(256, 3, 128)
    size, cin = 256, 128
    for i, cout in enumerate([128, 256, 512, 512, 512]):
        expected += resblock(size, cin, cout) + resblock(size, cout, cout)
        cin = cout
        if i < 4:
            size //= 2
            expected += conv(size, cout, cout)
    expected += 2 * resblock(16, 512, 512) + conv(16, 512, 32)
    assert count_flops(Tokenizer.encode, tok, _s(1, 256, 256, 3)) == expected
