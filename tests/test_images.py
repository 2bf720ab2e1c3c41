"""Image files: loading any mode, cover-resize + centre crop, [-1, 1] conversion, PNG output."""

import os

import numpy as np
import pytest
from PIL import Image

from infinity_jax import images, schedules

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "emoji3d")


def test_real_rgba_emoji_is_composited_on_white():
    planet = os.path.join(ASSETS, "1fa90.webp")  # 256 wide x 264 high, transparent background
    with Image.open(planet) as raw:
        assert raw.mode == "RGBA" and raw.size == (256, 264)
        alpha = np.asarray(raw)[..., 3]
    rgb = images.load_image(planet)
    assert rgb.mode == "RGB" and rgb.size == (256, 264)
    pixels = np.asarray(rgb)
    assert (pixels[alpha == 0] == 255).all(), "fully transparent pixels must become white"
    assert (pixels[alpha == 255] < 250).any(), "opaque content must survive"


@pytest.mark.parametrize("mode", ["L", "P", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    base = Image.new("RGBA", (10, 6), (40, 80, 120, 255))
    base.putpixel((0, 0), (0, 0, 0, 0))
    if mode == "P":
        image = base.convert("RGB").convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    elif mode == "I;16":
        image = Image.fromarray(np.full((6, 10), 1000, np.uint16))
    else:
        image = base.convert(mode) if mode != "LA" else base.convert("LA")
    path = str(tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}")
    image.save(path)
    rgb = images.load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (10, 6)
    if mode in ("P", "LA"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        images.load_image(str(broken))
    with pytest.raises(ValueError, match=r"cannot read image .*nope\.jpg"):
        images.load_image(str(tmp_path / "nope.jpg"))


@pytest.mark.parametrize("source_size", [(256, 264), (640, 480), (301, 1000), (1000, 562), (50, 50)])
def test_fit_to_covers_and_crops_to_every_template(source_size):
    image = Image.new("RGB", source_size, (10, 200, 30))
    for template in (1.0, 0.5, 3.0, 0.333, 1.333):
        size = schedules.infinity_schedule(template, "0.06M").pixel_size
        out = images.fit_to(image, size)
        assert out.size == (size[1], size[0])
        assert np.abs(np.asarray(out, np.int16) - (10, 200, 30)).max() <= 1


def test_fit_to_keeps_the_centre():
    """A wide image with a red left half and a blue right half, cropped to a square, stays half and half."""
    pixels = np.zeros((100, 400, 3), np.uint8)
    pixels[:, :200] = (255, 0, 0)
    pixels[:, 200:] = (0, 0, 255)
    out = np.asarray(images.fit_to(Image.fromarray(pixels), (64, 64)))
    assert (out[:, :30, 0] > 200).all() and (out[:, 34:, 2] > 200).all()


def test_unit_range_roundtrip_and_png(tmp_path):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    unit = images.to_unit(pixels)
    assert unit.dtype == np.float32 and unit.min() == -1.0 and unit.max() == 1.0
    back = images.from_unit(unit)
    assert np.abs(back.astype(int) - pixels).max() <= 1  # truncation, as the official sampler
    assert images.from_unit(np.array([[[-3.0, 0.0, 3.0]]])).tolist() == [[[0, 127, 255]]]
    with pytest.raises(ValueError, match="expected uint8"):
        images.to_unit(unit)
    path = images.save_png(unit, str(tmp_path / "out" / "a.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), back)
    with pytest.raises(ValueError, match=r"one \[H, W, 3\] image"):
        images.save_png(np.zeros((2, 4, 4, 3), np.uint8), str(tmp_path / "b.png"))


def test_load_for_a_schedule():
    schedule = schedules.schedule_for_image(264, 256, "0.06M")
    array = images.load_for(os.path.join(ASSETS, "1fa90.webp"), schedule.pixel_size)
    assert array.shape == (256, 256, 3) and array.dtype == np.float32
    assert -1.0 <= array.min() and array.max() == 1.0
