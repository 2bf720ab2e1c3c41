"""Test setup: 8 fake CPU devices, so multi-device sharding is tested on any machine.

This must run before JAX initialises its backends, which is why it lives here and not in a fixture.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
