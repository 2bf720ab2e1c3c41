"""The launch scripts: the gcloud/xpk commands they would run (DRY_RUN=1), their usage errors, and a real
2-process group on this machine through launch/gpu_host.sh (CPU devices, a localhost coordinator)."""

import os
import shlex
import subprocess
import sys

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")


def _run(script, *args, dry=True, **env):
    environment = {**os.environ, **({"DRY_RUN": "1"} if dry else {}), **env}
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, script), *args], env=environment, capture_output=True, text=True, timeout=300
    )


def test_tpu_run_targets_every_worker_with_distributed_init():
    done = _run("tpu_run.sh", "my-v5p", "us-east5-a", "--project", "p1", "--", "python", "-m", "infinity_jax.train",
                "--config", "configs/infinity.py:size=2b,batch=256", "--workdir", "gs://b/run")  # fmt: skip
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[:11] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p", "--zone", "us-east5-a", "--worker=all", "--project", "p1",
    ]  # fmt: skip
    assert argv[11] == "--command"
    remote = shlex.split(argv[12].replace(";", " ; "))  # what each worker's shell runs
    assert "INFINITY_JAX_DISTRIBUTED=1" in remote and "../venv-infinity-jax/bin/activate" in remote
    assert remote[remote.index("python") :][:6] == ["python", "-m", "infinity_jax.train", "--config",
                                                    "configs/infinity.py:size=2b,batch=256", "--workdir"]  # fmt: skip


def test_tpu_setup_is_idempotent_install_of_code_and_jax_tpu():
    done = _run("tpu_setup.sh", "my-v5p", "us-east5-a", REPO="https://example.com/ij.git")
    assert done.returncode == 0, done.stderr
    line = shlex.split(done.stdout)[-1]
    assert "--worker=all" in done.stdout and "git -C infinity_jax pull --ff-only" in line and "git clone" in line
    assert "[ -x venv-infinity-jax/bin/python ] || python3 -m venv" in line and "infinity_jax[tpu]" in line
    local = _run("tpu_setup.sh", "my-v5p", "us-east5-a")  # this checkout, copied with scp
    archive, copy, setup = (shlex.split(line) for line in local.stdout.splitlines())
    assert archive[0:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
    assert "tar -xzf infinity_jax.tar.gz -C infinity_jax" in setup[-1]


def test_xpk_workload():
    done = _run(
        "xpk.sh", "cl", "job1", "v5p-256", "2", "gcr.io/p/ij:latest", "--", "python", "-m", "infinity_jax.train"
    )
    assert done.returncode == 0, done.stderr
    argv = shlex.split(done.stdout)
    assert argv[:11] == ["xpk", "workload", "create", "--cluster", "cl", "--workload", "job1", "--tpu-type",
                         "v5p-256", "--num-slices", "2"]  # fmt: skip
    assert argv[11:13] == ["--docker-image", "gcr.io/p/ij:latest"] and argv[13] == "--command"
    assert shlex.split(argv[14]) == ["INFINITY_JAX_DISTRIBUTED=1", "python", "-m", "infinity_jax.train"]
    gpu = _run("xpk.sh", "cl", "job1", "h100-80gb-8", "1", "img", "--", "true")
    assert "--device-type h100-80gb-8" in gpu.stdout


@pytest.mark.parametrize("script", ["tpu_run.sh", "tpu_setup.sh", "xpk.sh", "gpu_host.sh"])
def test_usage_errors(script):
    done = _run(script)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_gpu_host_starts_one_jax_group(tmp_path):
    probe = (
        "import jax; from infinity_jax.train.loop import maybe_initialize_distributed; "
        "maybe_initialize_distributed(); print('group', jax.process_index(), jax.process_count(), jax.device_count())"
    )
    env = {"JAX_PLATFORMS": "cpu", "LOG_DIR": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = _run("gpu_host.sh", "--processes", "2", "--", sys.executable, "-c", probe, dry=False, **env)
    assert done.returncode == 0, done.stderr + "".join(open(tmp_path / f).read() for f in os.listdir(tmp_path))
    for i in range(2):
        assert f"group {i} 2 4" in (tmp_path / f"process_{i}.log").read_text()
    failing = _run("gpu_host.sh", "--processes", "2", "--", sys.executable, "-c", "raise SystemExit(3)", dry=False,
                   LOG_DIR=str(tmp_path))  # fmt: skip
    assert failing.returncode == 1 and "process 0 failed" in failing.stderr
