"""The grain input pipeline: raw records -> host batches of one aspect-ratio template each (static shapes).

    source ─▶ bucket by template (h/w of the record, nearest allowed template)
      each bucket: shuffle (reshuffled every epoch) ─▶ repeat ─▶ this process's slice [p::P]
                   ─▶ load (decode, RGB, cover-resize + centre crop, caption choice, T5 tokens) ─▶ skip bad ─▶ batch
    ─▶ mix buckets in proportion to their sizes ─▶ (worker processes) ─▶ iterator (checkpointable)

Every record is read by exactly one process. A record that cannot be used (missing or corrupt file, image too
small or too large, empty caption, no label) is skipped with one rate-limited warning line and counted in the
batch's `skipped` field, which the trainer adds to its metrics; a long run of unusable records stops the run.
Batches hold numpy arrays: `image` uint8 [b, H, W, 3], `tokens` int32 / `text_mask` bool [b, T] or `label`
int32 [b], `template` float32 [b], `id` int64 [b] (the record's index in its source), `skipped` int32 [b].
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from infinity_jax import images, schedules, text

MAX_CONSECUTIVE_BAD = 1000
_log = logging.getLogger("infinity_jax.data")


class _RateLimitedWarnings:
    """At most one warning line per `interval` seconds; the lines in between are counted, not lost."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.last, self.suppressed = interval, -float("inf"), 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" (and {self.suppressed} more skipped since the last warning)" if self.suppressed else ""
        _log.warning("skipping record: %s%s", message, more)
        self.last, self.suppressed = now, 0


_WARNINGS = _RateLimitedWarnings()


def assign_templates(h_div_w: np.ndarray, templates, default: float) -> np.ndarray:
    """[N] template of every record: the allowed template nearest to its h/w (`default` where unknown)."""
    allowed = np.asarray(sorted(schedules.template_key(t) for t in templates))
    known = np.isfinite(h_div_w) & (h_div_w > 0)
    nearest = allowed[np.argmin(np.abs(np.where(known, h_div_w, 1.0)[:, None] - allowed[None]), axis=1)]
    return np.where(known, nearest, schedules.template_key(default))


class BadRecord(Exception):
    pass


def _open(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(image if image.ndim == 3 else image[..., 0])
    if isinstance(image, bytes):
        return Image.open(io.BytesIO(image))
    return Image.open(image)


def read_image(image, size: tuple[int, int], min_size: int, max_pixels: int) -> np.ndarray:
    """A path, encoded bytes or decoded array -> uint8 [H, W, 3] at `size`; BadRecord says why it cannot be used."""
    try:
        with _open(image) as opened:
            width, height = opened.size  # from the header: size limits are checked before decoding
            if min(width, height) < min_size:
                raise BadRecord(f"image is {width}x{height}, smaller than data.min_size={min_size}")
            if width * height > max_pixels:
                raise BadRecord(f"image is {width}x{height}, more than data.max_pixels={max_pixels}")
            opened.load()
            rgb = images.to_rgb(opened)
    except FileNotFoundError:
        raise BadRecord("file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadRecord(f"cannot decode image ({error})") from None
    return np.asarray(images.fit_to(rgb, size), np.uint8)


@dataclasses.dataclass(frozen=True)
class Preprocess(grain.transforms.RandomMap):
    """Raw record -> model inputs of one template; an unusable record becomes {"id", "error"}.

    cond: "text" (pick the short caption with probability `short_caption_prob`, else the long one when present,
    then T5-tokenize to `max_length`), "class" (the record's `label`) or "none" (images only: tokenizer training).
    Records written by `data.precompute` carry the tokenizer's latent (`latent`, checked against `latent_grid`) and
    T5 features of their captions (`text_features`, `long_text_features`: the caption's rows only) instead of
    an image and captions; the example then holds `latent` [h, w, d] and `text` [max_length, Ct5] + `text_mask`.
    """

    pixel_size: tuple[int, int]
    template: float
    cond: str
    text_tokenizer: object = None
    max_length: int = 512
    short_caption_prob: float = 0.5
    min_size: int = 16
    max_pixels: int = 1 << 26
    latent_grid: tuple[int, int] | None = None

    def random_map(self, raw: dict, rng: np.random.Generator) -> dict:
        try:
            example = {"id": np.int64(raw["id"]), "template": np.float32(self.template)}
            example.update(self._condition(raw, rng))
            if "latent" in raw:
                example["latent"] = self._latent(raw["latent"])
            else:
                example["image"] = read_image(raw.get("image"), self.pixel_size, self.min_size, self.max_pixels)
            return example
        except BadRecord as error:
            return {"id": np.int64(raw["id"]), "error": f"{_describe(raw)}: {error}"}

    def _condition(self, raw: dict, rng: np.random.Generator) -> dict:
        if self.cond == "none":
            return {}
        if self.cond == "class":
            if raw.get("label") is None:
                raise BadRecord("no label")
            return {"label": np.int32(raw["label"])}
        long = rng.random() >= self.short_caption_prob
        if "text_features" in raw:
            features = raw.get("long_text_features") if long else None
            return self._features(load_array(features or raw["text_features"]))
        if self.text_tokenizer is None:  # a config error, not a bad record: stop
            raise ValueError(
                "data.precomputed=True but the records hold captions, not T5 features: write them with "
                "python -m infinity_jax.data.precompute, or set data.precomputed=False"
            )
        caption = raw.get("text") or ""
        if raw.get("long_caption") and long:
            caption = raw["long_caption"]
        if not str(caption).strip():
            raise BadRecord("empty caption")
        tokens, mask = text.tokenize(self.text_tokenizer, [str(caption)], self.max_length)
        return {"tokens": tokens[0], "text_mask": mask[0]}

    def _features(self, rows: np.ndarray) -> dict:
        if rows.ndim != 2 or not 0 < len(rows) <= self.max_length:
            raise BadRecord(f"text features of shape {rows.shape}, expected [1..{self.max_length}, Ct5]")
        padded = np.zeros((self.max_length, rows.shape[1]), np.float32)
        padded[: len(rows)] = rows
        return {"text": padded, "text_mask": np.arange(self.max_length) < len(rows)}

    def _latent(self, data: bytes) -> np.ndarray:
        latent = load_array(data).astype(np.float32)
        if latent.ndim != 3 or tuple(latent.shape[:2]) != tuple(self.latent_grid):
            raise BadRecord(f"latent of shape {latent.shape}, expected {tuple(self.latent_grid)} x d")
        return latent


def save_array(array: np.ndarray) -> bytes:
    """An array as .npy bytes (how precomputed records store latents and text features)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_array(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadRecord(f"cannot read a stored array ({error})") from None


def _describe(raw: dict) -> str:
    image = raw.get("image")
    where = image if isinstance(image, str) else f"record {raw['id']}"
    return str(where)


@dataclasses.dataclass(frozen=True)
class _Lookup(grain.transforms.Map):
    source: object

    def map(self, index):
        return self.source[int(index)]


class _SkipBadIterator(grain.DatasetIterator):
    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if "error" not in element:
                element["skipped"] = np.int32(skipped)
                return element
            skipped += 1
            _WARNINGS.warn(element["error"])
            if skipped >= MAX_CONSECUTIVE_BAD:
                raise RuntimeError(
                    f"{skipped} consecutive records could not be used (last: {element['error']}); "
                    "check data.path and the data itself"
                )

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


@dataclasses.dataclass(frozen=True)
class _Block(grain.transforms.Map):
    """Position j of one process's stream -> element (j // l)·P·l + p·l + j % l of the global stream."""

    stream: grain.MapDataset
    local_batch: int
    process_index: int
    process_count: int

    def map(self, j):
        block, row = divmod(j, self.local_batch)
        return self.stream[(block * self.process_count + self.process_index) * self.local_batch + row]


class SkipBad(grain.IterDataset):
    """Drops unusable records; the next good element's `skipped` says how many were dropped before it."""

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__())


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the pipeline must produce for one run."""

    resolution: str
    cond: str
    global_batch: int
    templates: tuple[float, ...] = (1.0,)
    default_template: float = 1.0
    seed: int = 0
    text_tokenizer: object = None
    max_length: int = 512
    short_caption_prob: float = 0.5
    min_size: int = 16
    max_pixels: int = 1 << 26
    workers: int = 0
    read_threads: int = 16
    read_ahead: int = 4  # batches per bucket
    latent_stride: int = schedules.VAE_STRIDE  # pixels per latent cell (8 for the patchified f8 tokenizer)


def make_dataset(source, spec: InputSpec, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite, checkpointable stream of this process's batches (global_batch / process_count each)."""
    if spec.global_batch % process_count:
        raise ValueError(f"global batch {spec.global_batch} is not divisible by {process_count} processes")
    local_batch = spec.global_batch // process_count
    buckets = assign_templates(source.h_div_w, spec.templates, spec.default_template)
    datasets, weights = [], []
    for number, template in enumerate(np.unique(buckets)):
        indices = np.flatnonzero(buckets == template)
        if len(indices) < process_count:
            continue
        schedule = schedules.infinity_schedule(float(template), spec.resolution)
        preprocess = Preprocess(
            schedule.pixel_size,
            float(template),
            spec.cond,
            spec.text_tokenizer,
            spec.max_length,
            spec.short_caption_prob,
            spec.min_size,
            spec.max_pixels,
            tuple(p // spec.latent_stride for p in schedule.pixel_size),
        )
        stream = (
            grain.MapDataset.source(indices)
            .shuffle(seed=spec.seed + number)
            .repeat()
            .map(_Lookup(source))
            .random_map(preprocess, seed=spec.seed)
        )
        # Process p reads rows [p·l, (p+1)·l) of every global batch of the one global stream, so that the batch
        # the processes assemble is the single-process batch, row for row (per-row randomness included).
        records = grain.MapDataset.range(len(stream)).map(_Block(stream, local_batch, process_index, process_count))
        reading = grain.ReadOptions(num_threads=spec.read_threads, prefetch_buffer_size=spec.read_ahead * local_batch)
        datasets.append(SkipBad(records.to_iter_dataset(reading)).batch(local_batch, drop_remainder=True))
        weights.append(len(indices))
    if not datasets:
        raise ValueError(f"the source has no records ({len(source)} in total) for {process_count} processes")
    dataset = datasets[0] if len(datasets) == 1 else grain.IterDataset.mix(datasets, weights)
    if spec.workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.workers))
    return dataset
