"""Zero-shot editing by teacher forcing (VAR's in-painting, out-painting and class-conditional editing, REFERENCE §9):
the tokens of the region to keep are the image's own at every scale, the rest is generated around them.

A keep mask (1 = keep the given image) at pixel or latent resolution becomes one boolean mask per scale: the mask
on the last grid, bilinearly resized to each scale and thresholded at 0.5; scales of at most 3 tokens are kept
whole (the official demo's rule), so that the global layout comes from the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from infinity_jax.ops.resize import area_resize, bilinear_resize
from infinity_jax.schedules import Schedule


def scale_masks(keep: jax.Array, schedule: Schedule) -> tuple[jax.Array, ...]:
    """keep: [B, H, W] in [0, 1] (pixels, or the last grid) -> per scale [B, h_k, w_k] bool (True = keep)."""
    if keep.ndim != 3:
        raise ValueError(f"a keep mask must be [B, H, W], got shape {tuple(keep.shape)}")
    height, width = keep.shape[1:]
    grid_h, grid_w = schedule.grid
    if height % grid_h or width % grid_w:
        raise ValueError(f"mask {height}x{width} is not a multiple of the last token grid {schedule.grid}")
    last = area_resize(jnp.asarray(keep, jnp.float32)[..., None], schedule.grid)
    masks = []
    for h, w in schedule.scales:
        if h * w <= 3:
            masks.append(jnp.ones((keep.shape[0], h, w), bool))
        else:
            masks.append(bilinear_resize(last, (h, w))[..., 0] > 0.5)
    return tuple(masks)


def teacher_masks(batch: int, schedule: Schedule, num_scales: int) -> tuple[jax.Array, ...]:
    """Teacher forcing of the first `num_scales` scales: all True there, all False after."""
    return tuple(jnp.full((batch, h, w), k < num_scales) for k, (h, w) in enumerate(schedule.scales))


def check_known(values: Sequence, masks: Sequence, schedule: Schedule, batch: int, tail: tuple[int, ...], what: str):
    """Validated (values per scale [B, h, w, *tail] int32, masks per scale [B, h, w] bool) for every scale."""
    if len(values) != schedule.num_scales or len(masks) != schedule.num_scales:
        raise ValueError(
            f"known {what} and masks need one entry per scale ({schedule.num_scales}), got {len(values)} and {len(masks)}"
        )
    out_values, out_masks = [], []
    for k, (v, m, grid) in enumerate(zip(values, masks, schedule.scales, strict=True)):
        v, m = jnp.asarray(v, jnp.int32), jnp.asarray(m, bool)
        if v.shape != (batch, *grid, *tail) or m.shape != (batch, *grid):
            raise ValueError(
                f"scale {k}: known {what} must be {(batch, *grid, *tail)} and its mask {(batch, *grid)}, "
                f"got {v.shape} and {m.shape}"
            )
        out_values.append(v)
        out_masks.append(m)
    return tuple(out_values), tuple(out_masks)
