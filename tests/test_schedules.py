"""Scale schedules against the official table (REFERENCE §1, §9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax import schedules

# REFERENCE §1: h/w -> {resolution: (pixel H, pixel W, K, L)}.
OFFICIAL = {
    0.333: {"0.06M": (144, 432, 7, 509), "0.25M": (288, 864, 10, 2588), "0.60M": (480, 1440, 12, 7016), "1M": (592, 1776, 13, 11123)},
    0.4: {"0.06M": (160, 400, 7, 555), "0.25M": (320, 800, 10, 2555), "0.60M": (512, 1280, 12, 6805), "1M": (640, 1600, 13, 10805)},
    0.5: {"0.06M": (176, 352, 7, 451), "0.25M": (368, 736, 10, 2681), "0.60M": (592, 1184, 12, 7219), "1M": (720, 1440, 13, 11269)},
    0.571: {"0.06M": (192, 336, 7, 472), "0.25M": (384, 672, 10, 2628), "0.60M": (640, 1120, 12, 7220), "1M": (768, 1344, 13, 11252)},
    0.666: {"0.06M": (224, 336, 7, 533), "0.25M": (416, 624, 10, 2759), "0.60M": (672, 1008, 12, 6941), "1M": (832, 1248, 13, 10997)},
    0.75: {"0.06M": (240, 320, 7, 665), "0.25M": (432, 576, 10, 2657), "0.60M": (720, 960, 12, 7085), "1M": (864, 1152, 13, 10973)},
    0.8: {"0.06M": (256, 320, 7, 614), "0.25M": (448, 560, 10, 2814), "0.60M": (704, 880, 12, 6854), "1M": (896, 1120, 13, 10774)},
    1.0: {"0.06M": (256, 256, 7, 521), "0.25M": (512, 512, 10, 2521), "0.60M": (768, 768, 12, 6425), "1M": (1024, 1024, 13, 10521)},
    1.25: {"0.06M": (320, 256, 7, 614), "0.25M": (560, 448, 10, 2814), "0.60M": (880, 704, 12, 6854), "1M": (1120, 896, 13, 10774)},
    1.333: {"0.06M": (320, 240, 7, 665), "0.25M": (576, 432, 10, 2657), "0.60M": (960, 720, 12, 7085), "1M": (1152, 864, 13, 10973)},
    1.5: {"0.06M": (336, 224, 7, 533), "0.25M": (624, 416, 10, 2759), "0.60M": (1008, 672, 12, 6941), "1M": (1248, 832, 13, 10997)},
    1.75: {"0.06M": (336, 192, 7, 472), "0.25M": (672, 384, 10, 2628), "0.60M": (1120, 640, 12, 7220), "1M": (1344, 768, 13, 11252)},
    2.0: {"0.06M": (352, 176, 7, 451), "0.25M": (736, 368, 10, 2681), "0.60M": (1184, 592, 12, 7219), "1M": (1440, 720, 13, 11269)},
    2.5: {"0.06M": (400, 160, 7, 555), "0.25M": (800, 320, 10, 2555), "0.60M": (1280, 512, 12, 6805), "1M": (1600, 640, 13, 10805)},
    3.0: {"0.06M": (432, 144, 7, 509), "0.25M": (864, 288, 10, 2588), "0.60M": (1440, 480, 12, 7016), "1M": (1776, 592, 13, 11123)},
}  # fmt: skip


def test_fifteen_templates_in_official_order():
    assert schedules.H_DIV_W_TEMPLATES == (
        1.0,
        1.25,
        0.8,
        1.333,
        0.75,
        1.5,
        0.666,
        1.75,
        0.571,
        2.0,
        0.5,
        2.5,
        0.4,
        3.0,
        0.333,
    )
    assert set(OFFICIAL) == set(schedules.H_DIV_W_TEMPLATES)


@pytest.mark.parametrize("template", sorted(OFFICIAL))
def test_every_template_and_resolution_matches_reference(template):
    for resolution, (height, width, k, tokens) in OFFICIAL[template].items():
        s = schedules.infinity_schedule(template, resolution)
        assert (s.pixel_size, s.num_scales, s.num_tokens) == ((height, width), k, tokens), (template, resolution)
        assert s.scales[0] == (1, 1)
        assert s.scales == schedules.infinity_schedule(template, "1M").scales[:k], "lower resolutions are prefixes"
        assert abs(s.grid[0] / s.grid[1] - template) < 0.01


def test_per_scale_counts_and_offsets():
    s = schedules.infinity_schedule(1.0, "1M")
    assert s.tokens_per_scale == (1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096)
    assert s.offsets[0] == 0 and s.offsets[-1] == 10521 and s.offsets[3] == 21
    ids = s.scale_ids()
    assert ids.shape == (10521,) and ids[0] == 0 and ids[1:5].tolist() == [1] * 4 and ids[-1] == 12
    assert np.bincount(ids).tolist() == list(s.tokens_per_scale)


def test_nearest_template_and_image_lookup():
    assert schedules.nearest_template(1.0) == 1.0
    assert schedules.nearest_template(0.7) == 0.666
    assert schedules.nearest_template(10.0) == 3.0
    assert schedules.nearest_template(0.01) == 0.333
    # A tie between 1.0 and 1.25 goes to the first template in the official order, as numpy's argmin.
    assert schedules.nearest_template(1.125) == 1.0
    s = schedules.schedule_for_image(768, 1024, "0.25M")
    assert s.name == "0.75@0.25M" and s.pixel_size == (432, 576)
    assert schedules.rope_grid(0.333) == (37, 111)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid resolutions: 0\.004M, 0\.016M, 0\.06M, 0\.25M, 0\.60M, 1M"):
        schedules.infinity_schedule(1.0, "2M")
    with pytest.raises(
        ValueError, match=r"valid h/w templates: 0\.333, 0\.4, .*3\.0.*nearest_template\(0\.7\) = 0\.666"
    ):
        schedules.infinity_schedule(0.7, "1M")
    with pytest.raises(ValueError, match="valid: 256, 512, 1024"):
        schedules.var_schedule(384)
    with pytest.raises(ValueError, match="positive"):
        schedules.nearest_template(-1.0)
    with pytest.raises(ValueError, match="positive size"):
        schedules.Schedule(((1, 1), (0, 2)))


def test_var_patch_nums():
    s256, s512 = schedules.var_schedule(256), schedules.var_schedule(512)
    assert [h for h, _ in s256.scales] == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16] and s256.num_tokens == 680
    assert s256.pixel_size == (256, 256)
    assert s512.num_tokens == 2240 and s512.pixel_size == (512, 512)
    assert schedules.var_schedule((1, 2, 3)).num_tokens == 14


def test_upsampled_prefix_and_jit_static():
    s = schedules.infinity_schedule(1.333, "0.06M")
    f8 = s.upsampled(2)
    assert f8.scales[0] == (2, 2) and f8.grid == (40, 30) and f8.stride == 8 and f8.pixel_size == s.pixel_size
    assert s.prefix(3).scales == s.scales[:3]
    with pytest.raises(ValueError):
        s.prefix(8)
    # Schedules are hashable static arguments: one compile per schedule.
    f = jax.jit(lambda x, sched: x * sched.num_tokens, static_argnums=1)
    assert int(f(jnp.ones(()), s)) == 665
