"""Infinity: bitwise next-scale text-to-image generation (REFERENCE §3), and its class-conditional variant.

Arguments (after the colon): size (a name from infinity_jax/models/sizes.py or an alias such as 2b, 125m),
res (0.004M, 0.016M, 0.06M, 0.25M, 0.60M or 1M), tokenizer (d16, d24, d32, d32reg, d64, d14_f8, tiny; by
default the one the size was released with: d32reg, and d14_f8 — stride 8 with 2×2 patchify — for 8B),
cond (text or class), classes (number of classes for cond=class), t5 (flan_t5_xl or tiny), batch (global).

    python -m infinity_jax.describe --config configs/infinity.py:size=infinity_2b,res=1M

Training (the tokenizer and T5 weights are frozen; give converted/official files, or "random" for smoke runs):

    python -m infinity_jax.train --config configs/infinity.py:size=2b,res=0.06M,batch=16 --workdir runs/2b \\
        --config.data.path=data/train.jsonl --config.tokenizer.checkpoint=infinity_vae_d32reg.pth \\
        --config.text.checkpoint=flan-t5-xl/

Launch (measured: 2B at 256², batch 16, cuDNN attention, on one H200: 0.449 s/step, 18.6k tokens/s, 63 GiB peak;
at 512², batch 8: 0.986 s/step, 94 GiB; with --config.model.remat=dots_saveable, the faster choice where memory
allows: 0.416 s/step (20.0k tokens/s) and 0.912 s/step (22.1k tokens/s), same peaks; benchmarks/RESULTS.md):

    launch/gpu_host.sh -- python -m infinity_jax.train --config configs/infinity.py:size=2b,res=0.06M,batch=16 \
        --workdir runs/2b --config.model.attention=cudnn --config.data.path=data/train.jsonl …
    launch/tpu_setup.sh my-v5p-128 us-east5-a && launch/tpu_run.sh my-v5p-128 us-east5-a -- \
        python -m infinity_jax.train --config configs/infinity.py:size=2b,res=0.06M,batch=256 --workdir gs://b/2b \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.attention=splash …

Before renting a slice, compile the step for it here (needs libtpu; per-chip memory, FLOPs, predicted time). For
the 2B layout at 256², batch 256 on v5p:4x4x4 with pure FSDP: 5.2 GiB of 95 per chip, ~0.21 s/step at 45 % MFU:

    python -m infinity_jax.aot --config configs/infinity.py:size=2b,res=0.06M,batch=256 \
        --topology v5p:4x4x4 --mesh data=1,fsdp=64,tensor=1

A CPU smoke run on the emoji3d set (64² images, tiny model, random frozen towers):

    python -m infinity_jax.train --workdir /tmp/tiny \\
        --config configs/infinity.py:size=tiny,res=0.004M,tokenizer=tiny,t5=tiny,batch=8 \\
        --config.data.path=../shared/data/emoji3d/metadata.jsonl \\
        --config.tokenizer.checkpoint=random --config.text.checkpoint=random \\
        --config.text.tokenizer=tests/assets/t5_tokenizer/tokenizer.json --config.train.num_steps=200
"""

import ml_collections

from infinity_jax import config as config_lib
from infinity_jax.models.t5 import get_t5_layout


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg, size="infinity_2b", res="1M", tokenizer="", cond="text", classes=1000, t5="flan_t5_xl", batch=16
    )
    tiny = arg.size == "tiny"
    config = ml_collections.ConfigDict()
    config.tokenizer = config_lib.tokenizer_config(arg.tokenizer or config_lib.default_tokenizer(arg.size))
    config.tokenizer.checkpoint = ""
    config.tokenizer.dtype = "float32"
    config.model = config_lib.infinity_model_config(arg.size, config.tokenizer)
    config.model.cond = arg.cond
    config.model.num_classes = arg.classes
    config.model.dtype = "float32" if tiny else "bfloat16"
    config.model.scan_blocks = not tiny
    config.model.remat = "none" if tiny else "nothing_saveable"
    config.model.remat_free = 0  # unrolled blocks only: the last N blocks are not rematerialised
    config.model.attention = "xla"
    if arg.cond == "text":
        config.text = config_lib.text_config(arg.t5)
        config.model.text_dim = get_t5_layout(arg.t5).d_model
        if tiny:
            config.text.max_length = 32
    config.schedule = ml_collections.ConfigDict({"resolution": arg.res})
    config.bsc = config_lib.bsc_config()
    config.data = config_lib.data_config()
    config.data.templates = (1.0,) if tiny else config.data.templates
    config.train = config_lib.train_config(batch_size=arg.batch)
    config.eval = config_lib.eval_config()
    config.optim = config_lib.optim_config()
    config.mesh = config_lib.mesh_config()
    config.sharding = config_lib.sharding_config()
    config.seed = 0
    return config
