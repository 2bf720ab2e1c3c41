# The tokenizer recipe of the 28.9 dB emoji3d run (benchmarks/RESULTS.md), sourced by tokenizer_emoji3d.sh and
# scaling_emoji3d.sh so both train the same tokenizer. Defines tokenizer_recipe=(config flags) for $minutes, which
# include the ~2 minutes of compilation on an H200 (2.5 minutes gave only 155–644 steps there).
# shellcheck shell=bash
tokenizer_recipe=(
  --config.tokenizer.dtype=bfloat16
  --config.train.num_steps=100000 --config.train.max_minutes="$minutes"
  --config.train.eval_every=1000 --config.train.checkpoint_every=100000
  --config.train.ema_decay=0.995 --config.optim.lr=3e-4 --config.optim.warmup_steps=200
  --config.loss.disc_start=2500 --config.loss.gan=0.1 --config.loss.lecam=0.05
  --config.eval.fid=False
)
