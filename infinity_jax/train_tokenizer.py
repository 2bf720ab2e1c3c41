"""`python -m infinity_jax.train_tokenizer --config configs/tokenizer.py:<args> --workdir DIR [--config.a.b=v …]`.

Trains a BSQ-VAE tokenizer on the shared trainer; rerunning the same command resumes from the newest checkpoint
in DIR. The evaluated weights are written to DIR/tokenizer (a params checkpoint for `tokenizer.checkpoint`).
"""

from absl import flags

from infinity_jax import cli
from infinity_jax.train.vae import train

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard and samples.")


def main(config):
    if config.get("task") != "tokenizer":
        raise SystemExit("error: this trains tokenizers; use a tokenizer config such as configs/tokenizer.py")
    cli.train_in(train, config, WORKDIR.value)


def console_main():
    cli.run(main)


if __name__ == "__main__":
    console_main()
