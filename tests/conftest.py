"""Test setup: 8 fake CPU devices, so multi-device sharding is tested on any machine.

This must run before JAX initialises its backends, which is why it lives here and not in a fixture.
"""

import os

from jaxlib import version as _jaxlib_version  # the version only: no backend starts

# Tests check numbers, not speed, and most of the suite's time is XLA compiling small programs for the CPU. LLVM's
# -O0 halves it. On jaxlib 0.10, XLA's older loop emitters (in place of the MLIR fusion emitters) halve the tiny
# train step's compile again (16 → 7.5 s here), with the same losses and step time; jaxlib 0.11 has only the MLIR
# emitters and rejects the flag.
_FLAGS = " --xla_backend_optimization_level=0"
if _jaxlib_version.__version__.startswith("0.10."):
    _FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FLAGS).strip()

# Many tests compile the same tiny programs (one train step, in several tests and subprocesses): JAX's persistent
# compilation cache, in a folder made once per test session (the xdist workers and subprocesses inherit it), turns
# the repeats into reads.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="infinity_jax_test_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# CPU only, also on a TPU VM or GPU host and with libtpu installed (tests/test_aot.py compiles for TPU
# topologies explicitly, which works without a TPU backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling for TPU topologies loads libtpu, which by default allows one process per host; compile-only use is
# safe to share (subprocess tests, or another test run on the same machine).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402 (after the environment it reads)

jax.config.update("jax_num_cpu_devices", 8)


def pytest_unconfigure(config):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:  # the session's first process made it
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
