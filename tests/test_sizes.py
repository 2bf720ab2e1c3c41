"""The size table against the official parameter counts (REFERENCE §3.1, §9)."""

import pytest

from infinity_jax import schedules
from infinity_jax.models import sizes

# REFERENCE §3.1 (d = 32; the 8B model sees 56 bits per token).
INFINITY_PARAMS = {
    "infinity_layer12": 125_185_696,
    "infinity_layer16": 361_633_792,
    "infinity_layer24": 940_944_832,
    "infinity_layer32": 2_256_694_912,
    "infinity_layer40": 4_716_421_888,
    "infinity_layer48": 8_767_198_528,
    "infinity_2b": 2_204_564_032,
    "infinity_8b": 8_375_791_824,
}
# Counted from the official VAR models instantiated with torch (transformer only, VAE excluded).
VAR_PARAMS = {("var_d16", 256): 310_283_520, ("var_d36", 512): 2_353_893_904}


@pytest.mark.parametrize("name,expected", sorted(INFINITY_PARAMS.items()))
def test_infinity_parameter_counts(name, expected):
    bits = 56 if name == "infinity_8b" else 32
    assert sizes.count_params(sizes.SIZES[name], bits=bits) == expected


def test_20b_and_var_counts():
    assert abs(sizes.count_params(sizes.SIZES["infinity_20b"]) - 19.95e9) < 0.01e9
    for (name, res), expected in VAR_PARAMS.items():
        s = schedules.var_schedule(res)
        assert sizes.count_params(sizes.get_size(name), num_tokens=s.num_tokens, num_scales=s.num_scales) == expected
    # The VAR paper's rounded sizes: d20 600M, d24 1.0B, d30 2.0B.
    for name, approx in [("var_d20", 0.6e9), ("var_d24", 1.0e9), ("var_d30", 2.0e9)]:
        assert abs(sizes.count_params(sizes.SIZES[name]) - approx) < 0.04e9


def test_layouts():
    two_b = sizes.get_size("2bc8")
    assert (two_b.depth, two_b.embed_dim, two_b.num_heads, two_b.head_dim, two_b.block_chunks) == (32, 2048, 16, 128, 8)
    # Banker's rounding of the FFN width: 2080·4/256 = 32.5 -> 32 -> 8192.
    assert sizes.SIZES["infinity_layer32"].ffn_dim == 8192 and sizes.infinity_ffn_dim(2688) == 10752
    d30 = sizes.get_size("d30")
    assert (d30.embed_dim, d30.num_heads, d30.ffn_dim, d30.shared_aln) == (1920, 30, 7680, False)
    assert abs(d30.drop_path - 0.125) < 1e-12 and sizes.get_size("d36").shared_aln
    assert sizes.SIZES["infinity_20b"].drop_path == 0.25
    assert sizes.get_size("TINY").depth == 2 and sizes.canonical_name("125M") == "infinity_layer12"


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown model size 'infinity_3b'; valid sizes: tiny, infinity_layer12, .*aliases:"
    ):
        sizes.get_size("infinity_3b")
