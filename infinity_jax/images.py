"""Image files in and out, as every entry point reads and writes them.

Loading accepts any PIL mode and gives RGB (transparency composited on white, so emoji and logos keep their
look). `fit_to` resizes to cover the target with Lanczos and centre-crops, as the official training pipeline.
Pixels map to [-1, 1] as x/127.5 − 1 (the official `to_tensor·2 − 1`) and back with truncation, as the official
sampler writes images.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(source) -> Image.Image:
    """A path or file object -> RGB PIL image. Corrupt or unreadable files raise ValueError naming the file."""
    name = getattr(source, "name", source)
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {name!r}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; alpha (RGBA, LA, P with transparency) is composited on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resizes (Lanczos) to cover (H, W), then centre-crops to exactly (H, W)."""
    target_h, target_w = size
    width, height = image.size
    if width / height <= target_w / target_h:
        new_w, new_h = target_w, int(target_w * height / width)
    else:
        new_w, new_h = int(target_h * width / height), target_h
    # The official code truncates the same way but can land one pixel short of the target; never crop past it.
    new_w, new_h = max(new_w, target_w), max(new_h, target_h)
    image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def to_unit(pixels) -> np.ndarray:
    """uint8 [..., 3] (or a PIL image) -> float32 in [-1, 1]."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    return pixels.astype(np.float32) / 127.5 - 1.0


def from_unit(images) -> np.ndarray:
    """float in [-1, 1] -> uint8, truncating (x+1)/2·255 as the official sampler does."""
    images = np.asarray(images, np.float32)
    return np.clip((images + 1.0) / 2.0 * 255.0, 0, 255).astype(np.uint8)


def load_for(source, size: tuple[int, int]) -> np.ndarray:
    """A file -> [H, W, 3] float32 in [-1, 1], resized and cropped to `size` (e.g. a schedule's pixel_size)."""
    return to_unit(fit_to(load_image(source), size))


def save_png(image, path: str) -> str:
    """Writes [H, W, 3] uint8, or float in [-1, 1], or a PIL image, as PNG. Returns the path."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"save_png expects one [H, W, 3] image, got shape {array.shape}")
        image = Image.fromarray(array if array.dtype == np.uint8 else from_unit(array))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")
    return path
