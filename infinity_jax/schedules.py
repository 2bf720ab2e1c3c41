"""Scale schedules: the token grids a next-scale model predicts, coarse to fine.

Infinity (REFERENCE §1): 15 aspect-ratio templates (h/w), each with 13 (h, w) grids at VAE stride 16; a
resolution takes the first K grids, so lower resolutions are prefixes of the 1M schedule. VAR (§9): square grids
("patch_nums"). The first scale is always 1x1: the SOS position.

A `Schedule` is hashable, so it can be a static argument of `jax.jit`: each (template, resolution) is one compiled
shape.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

VAE_STRIDE = 16

# Token grids (h, w) of the 1M schedule for h/w >= 1; the others are their transposes (REFERENCE §1).
_TALL_GRIDS = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}  # fmt: skip

# Number of scales per resolution. The official code defines 0.06M … 1M; 0.004M (64² at 1:1) and 0.016M (128²) are
# ours, shorter prefixes of the same grids, for small experiments (scaling studies, tests).
RESOLUTIONS = {"0.004M": 3, "0.016M": 5, "0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

VAR_PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def _template_grids() -> dict[float, tuple[tuple[int, int], ...]]:
    # Insertion order matches the official table (r, then its transpose), so that `nearest_template` breaks ties
    # the same way as numpy's argmin over it. The transposed key truncates 1/r to 3 decimals (1/1.5 -> 0.666).
    grids = {}
    for ratio, tall in _TALL_GRIDS.items():
        grids[ratio] = tall
        if ratio != 1.0:
            grids[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in tall)
    return grids


TEMPLATE_GRIDS = _template_grids()
H_DIV_W_TEMPLATES = tuple(TEMPLATE_GRIDS)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The ordered token grids of one image shape.

    Attributes:
      scales: ((h_1, w_1), ..., (h_K, w_K)) token grids, coarse to fine; tokens of a scale are row-major.
      stride: pixels per token of the last grid (the VAE's spatial stride).
      name: a label such as "1.0@1M" for logs.
      rope_grid: the grid whose coordinates 2D RoPE uses (the template's 1M grid, so that every resolution
        shares one position table); None: the schedule's own last grid.
    """

    scales: tuple[tuple[int, int], ...]
    stride: int = VAE_STRIDE
    name: str = ""
    rope_grid: tuple[int, int] | None = None

    def __post_init__(self):
        scales = tuple((int(h), int(w)) for h, w in self.scales)
        if not scales or any(h < 1 or w < 1 for h, w in scales):
            raise ValueError(f"a schedule needs at least one scale of positive size, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @property
    def num_tokens(self) -> int:
        """L = sum_k h_k * w_k."""
        return sum(self.tokens_per_scale)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the flattened sequence, plus L at the end (K + 1 entries)."""
        return tuple(int(x) for x in np.cumsum((0, *self.tokens_per_scale)))

    @property
    def grid(self) -> tuple[int, int]:
        """The last (finest) token grid: the latent's (h, w)."""
        return self.scales[-1]

    @property
    def position_grid(self) -> tuple[int, int]:
        """The grid RoPE positions are measured on: `rope_grid`, or the last grid."""
        return self.rope_grid or self.grid

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(H, W) in pixels of the images this schedule tokenizes."""
        h, w = self.grid
        return h * self.stride, w * self.stride

    def scale_ids(self) -> np.ndarray:
        """[L] int32: the scale index of every token."""
        return np.repeat(np.arange(self.num_scales, dtype=np.int32), self.tokens_per_scale)

    def prefix(self, num_scales: int) -> Schedule:
        """The first `num_scales` scales (e.g. the 0.25M schedule is a prefix of the 1M one)."""
        if not 1 <= num_scales <= self.num_scales:
            raise ValueError(f"prefix length must be in [1, {self.num_scales}], got {num_scales}")
        return Schedule(self.scales[:num_scales], self.stride, f"{self.name}[:{num_scales}]", self.rope_grid)

    def upsampled(self, factor: int) -> Schedule:
        """Grids multiplied by `factor` at stride / factor: the f8 VAE's view of a patchified schedule (§5.6)."""
        if self.stride % factor:
            raise ValueError(f"stride {self.stride} is not divisible by {factor}")
        return Schedule(
            tuple((h * factor, w * factor) for h, w in self.scales), self.stride // factor, f"{self.name}x{factor}"
        )


def _check_resolution(resolution: str) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; valid resolutions: {', '.join(RESOLUTIONS)}")
    return RESOLUTIONS[resolution]


def template_key(h_div_w: float) -> float:
    """The template equal to `h_div_w` (to 1e-6); ValueError listing the templates otherwise."""
    for template in H_DIV_W_TEMPLATES:
        if abs(float(h_div_w) - template) < 1e-6:
            return template
    valid = ", ".join(str(t) for t in sorted(H_DIV_W_TEMPLATES))
    raise ValueError(
        f"{h_div_w!r} is not an aspect-ratio template; valid h/w templates: {valid} "
        f"(nearest_template({h_div_w!r}) = {nearest_template(h_div_w)})"
    )


def nearest_template(h_div_w: float) -> float:
    """The template closest to h/w (first one on ties, as the official argmin)."""
    h_div_w = float(h_div_w)
    if not np.isfinite(h_div_w) or h_div_w <= 0:
        raise ValueError(f"h/w must be a positive finite number, got {h_div_w!r}")
    templates = np.asarray(H_DIV_W_TEMPLATES)
    return H_DIV_W_TEMPLATES[int(np.argmin(np.abs(h_div_w - templates)))]


@functools.cache
def infinity_schedule(h_div_w: float, resolution: str = "1M") -> Schedule:
    """The Infinity schedule of an aspect-ratio template at a resolution ("0.06M", "0.25M", "0.60M", "1M")."""
    template = template_key(h_div_w)
    k = _check_resolution(resolution)
    grids = TEMPLATE_GRIDS[template]
    return Schedule(grids[:k], VAE_STRIDE, f"{template}@{resolution}", rope_grid=grids[-1])


def schedule_for_image(height: int, width: int, resolution: str = "1M") -> Schedule:
    """The schedule of the template nearest to an image's h/w."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    return infinity_schedule(nearest_template(height / width), resolution)


def rope_grid(h_div_w: float) -> tuple[int, int]:
    """The final 1M grid of a template; RoPE positions of every resolution live on it (REFERENCE §3.6)."""
    return TEMPLATE_GRIDS[template_key(h_div_w)][-1]


def var_schedule(resolution: int | tuple[int, ...] = 256) -> Schedule:
    """VAR's square schedule: by image size (256, 512, 1024) or an explicit tuple of patch_nums."""
    if isinstance(resolution, (tuple, list)):
        patch_nums = tuple(int(p) for p in resolution)
        name = "var:" + "_".join(map(str, patch_nums))
    else:
        if resolution not in VAR_PATCH_NUMS:
            raise ValueError(f"unknown VAR resolution {resolution!r}; valid: {', '.join(map(str, VAR_PATCH_NUMS))}")
        patch_nums, name = VAR_PATCH_NUMS[resolution], f"var@{resolution}"
    return Schedule(tuple((p, p) for p in patch_nums), VAE_STRIDE, name)
