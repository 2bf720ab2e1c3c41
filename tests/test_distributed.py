"""Two processes × 4 CPU devices (a localhost coordinator, gloo collectives) train like one process × 8 devices:
the same losses step by step, each process reading its own half of every global batch, and one checkpoint."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from infinity_jax.train import checkpoint
from infinity_jax.train.trainer import train

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from distributed_worker import config

    _, single = train(config(), str(tmp_path / "single"))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        out = tmp_path / f"history_{pid}.json"
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(out), str(tmp_path / "multi")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    histories = [json.loads((tmp_path / f"history_{pid}.json").read_text()) for pid in range(2)]
    for step, reference in enumerate(single):
        rows = [h[step] for h in histories]
        np.testing.assert_allclose([r["loss"] for r in rows], reference["loss"], rtol=1e-5)
        ids = [set(r["example_ids"]) for r in rows]
        assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]  # each process its own half
        assert ids[0] | ids[1] == set(reference["example_ids"])
    assert checkpoint.Checkpointer(str(tmp_path / "multi"), 1, False).latest_step() == 3
