"""VAR: class-conditional next-scale prediction on ImageNet-style labels (REFERENCE §9), for scaling studies.

Arguments: size (var_d16 … var_d36, aliases d16 … d36, or var_tiny), res (256, 512 or 1024).

    python -m infinity_jax.describe --config configs/var.py:size=d16,res=256
    python -m infinity_jax.describe --config configs/var.py:size=d36,res=512

The released VAR runs here through the converter and the sampler (training VAR's VQ targets is not wired into the
trainer yet, so this config has no train command, step time or memory to give):

    python -m infinity_jax.convert var var_d16.pth ckpt/var_d16 && python -m infinity_jax.convert var vae_ch160v4096z32.pth ckpt/var_vae
    launch/gpu_host.sh -- python -m infinity_jax.sample --transformer ckpt/var_d16 --tokenizer ckpt/var_vae --class_id 207
"""

import ml_collections

from infinity_jax import config as config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, size="var_d16", res=256)
    config = ml_collections.ConfigDict()
    config.model = config_lib.var_model_config(arg.size)
    config.schedule = ml_collections.ConfigDict({"resolution": arg.res})
    config.seed = 0
    return config
