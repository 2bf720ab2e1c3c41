"""Infinity: bitwise next-scale text-to-image generation (REFERENCE §3).

Arguments (after the colon): size (a name from infinity_jax/models/sizes.py or an alias such as 2b, 125m),
res (0.06M, 0.25M, 0.60M or 1M), tokenizer (d16, d24, d32, d32reg, d64, d14_f8; by default the one the size was
released with: d32reg, and d14_f8 — stride 8 with 2×2 patchify, 56 bits per token — for the 8B size).

    python -m infinity_jax.describe --config configs/infinity.py:size=infinity_2b,res=1M
    python -m infinity_jax.describe --config configs/infinity.py:size=tiny,res=0.06M --config.bsc.strength=0.2
"""

import ml_collections

from infinity_jax import config as config_lib
from infinity_jax import schedules


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, size="infinity_2b", res="1M", tokenizer="")
    config = ml_collections.ConfigDict()
    config.tokenizer = config_lib.tokenizer_config(arg.tokenizer or config_lib.default_tokenizer(arg.size))
    config.model = config_lib.infinity_model_config(arg.size, config.tokenizer)
    config.schedule = ml_collections.ConfigDict({"resolution": arg.res, "templates": schedules.H_DIV_W_TEMPLATES})
    config.bsc = config_lib.bsc_config()
    config.seed = 0
    return config
