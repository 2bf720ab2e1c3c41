"""A scaling study (infinity_jax/scaling): sizes of the depthN rule (C = 64·depth) or of the size table, one budget.

Arguments (after the colon): sizes (joined by +, e.g. depth2+depth3+depth4+depth6+depth8: 0.3M–25M
parameters), tokens (training tokens per size; or flops, training FLOPs per size, which wins when > 0), evals
(held-out evaluations per run), cond (class or text), classes, res (0.004M = 64², 0.016M = 128², …), tokenizer,
bits (the tokenizer's bit depth d, 0 for its layout's; a vocabulary sweep runs one sweep per d, each with a
tokenizer trained at that d, and fits them together), t5, batch, dtype (float32 or bfloat16). Every 20th record is
held out (`data.holdout_every`) and evaluated teacher-forced; set `--config.eval.free_running=True` to also score
each model on its own earlier scales, and `--config.bsc.strength` to compare Bitwise Self-Correction strengths.

    python -m infinity_jax.scaling.sweep --workdir runs/scaling \\
        --config configs/scaling.py:cond=class,classes=10,res=0.016M,tokenizer=d32,tokens=2e7,dtype=bfloat16 \\
        --config.data.path=emoji3d/metadata.jsonl --config.tokenizer.checkpoint=runs/tok/tokenizer
    python -m infinity_jax.scaling.fit runs/scaling/* --out runs/scaling/fit

The largest size's step compiled for a TPU slice (`infinity_jax.aot` compiles the first size of `sizes`): depth8 at
128², batch 64 on v5e:2x2 takes 0.84 of 16 GiB per chip:

    python -m infinity_jax.aot --config configs/scaling.py:sizes=depth8,res=0.016M,batch=64 --topology v5e:2x2 \
        --mesh data=1,fsdp=4,tensor=1

A CPU smoke sweep on the test images (two tiny sizes, a few steps; `--list` prints one command per size):

    python -m infinity_jax.scaling.sweep --workdir /tmp/sweep \\
        --config configs/scaling.py:sizes=depth1+depth2,tokenizer=tiny,res=0.004M,batch=4,tokens=2000,evals=2 \\
        --config.data.path=tests/assets/emoji3d/set/metadata.jsonl --config.tokenizer.checkpoint=random \\
        --config.data.holdout_every=3
"""

import os

from infinity_jax import config as config_lib
from infinity_jax.cli import load_config_file


def get_config(arg=None):
    arg = config_lib.parse_arg(
        arg,
        sizes="depth2+depth3+depth4+depth6+depth8",
        tokens=2e7,
        flops=0.0,
        evals=8,
        cond="class",
        classes=10,
        res="0.016M",
        tokenizer="d32",
        bits=0,
        t5="tiny",
        batch=64,
        dtype="float32",
    )
    first = arg.sizes.split("+")[0]
    config = load_config_file(
        f"{os.path.join(os.path.dirname(__file__), 'infinity.py')}:size={first},res={arg.res},"
        f"tokenizer={arg.tokenizer},cond={arg.cond},classes={arg.classes},t5={arg.t5},batch={arg.batch}"
    )
    if arg.bits:
        config.tokenizer.bits = arg.bits
        config.model.bits = config_lib.tokenizer_layout(config.tokenizer).token_bits
    config.model.dtype = arg.dtype
    config.model.scan_blocks = False  # small models: a scan only costs time here
    config.model.remat = "none"
    if arg.cond == "text":
        config.text.max_length = 32  # the short captions; longer ones are truncated as by the official pipeline
    config.data.templates = (1.0,)
    config.data.holdout_every = 20
    config.data.short_caption_prob = 1.0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.sweep = config_lib.sweep_config(arg.sizes, arg.tokens, arg.flops, arg.evals)
    return config
