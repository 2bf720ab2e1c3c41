"""`python -m infinity_jax.train --config configs/<x>.py:<args> --workdir DIR [--config.a.b=v …]`.

Trains the transformer; rerunning the same command resumes from the newest checkpoint in DIR.
"""

from absl import flags

from infinity_jax import cli
from infinity_jax.train.trainer import train

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard files.")


def main(config):
    cli.train_in(train, config, WORKDIR.value)


def console_main():
    cli.run(main)


if __name__ == "__main__":
    console_main()
