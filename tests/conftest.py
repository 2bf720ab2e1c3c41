"""Test setup: 8 fake CPU devices, so multi-device sharding is tested on any machine.

This must run before JAX initialises its backends, which is why it lives here and not in a fixture.
"""

import os

# Tests check numbers, not speed: LLVM's -O0 halves XLA's CPU compile time, and most of the suite's time is
# compiling small programs.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# CPU only, also on a TPU VM or GPU host and with libtpu installed (tests/test_aot.py compiles for TPU
# topologies explicitly, which works without a TPU backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling for TPU topologies loads libtpu, which by default allows one process per host; compile-only use is
# safe to share (subprocess tests, or another test run on the same machine).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

jax.config.update("jax_num_cpu_devices", 8)
