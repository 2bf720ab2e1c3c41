"""Array operations shared by the tokenizer, the quantizer and the transformer."""

from infinity_jax.ops.patchify import pixel_shuffle, pixel_unshuffle
from infinity_jax.ops.resize import area_resize, bicubic_resize, bilinear_resize, resize

__all__ = ["area_resize", "bicubic_resize", "bilinear_resize", "pixel_shuffle", "pixel_unshuffle", "resize"]
