"""One process of tests/test_distributed.py: the tiny text model for 3 steps on the emoji set; writes its metrics.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
        python tests/distributed_worker.py HISTORY.json WORKDIR
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

from test_train import tiny_config

from infinity_jax.train.trainer import train


def config():
    c = tiny_config(steps=3, record_example_ids=True, checkpoint_every=2)
    c.mesh.update(data=8, fsdp=1, tensor=1, num_devices=8)
    return c


if __name__ == "__main__":
    history_path, workdir = sys.argv[1:3]
    _, history = train(config(), workdir)
    with open(history_path, "w") as f:
        json.dump(history, f)
