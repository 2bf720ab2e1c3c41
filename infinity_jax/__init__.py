"""infinity_jax: Infinity (bitwise next-scale text-to-image) and VAR in JAX/Flax, for TPU pods and GPUs."""

__version__ = "0.1.0"
