"""`python -m infinity_jax.train --config configs/<x>.py:<args> --workdir DIR [--config.a.b=v …]`.

Trains the transformer; rerunning the same command resumes from the newest checkpoint in DIR.
"""

from absl import flags, logging

from infinity_jax import cli
from infinity_jax.train.trainer import train

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard files.")


def main(config):
    if not WORKDIR.value:
        raise SystemExit("error: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    train(config, WORKDIR.value)


def console_main():
    cli.run(main)


if __name__ == "__main__":
    console_main()
