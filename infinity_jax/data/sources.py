"""Random-access sources of raw training records, one per supported layout.

Every source has `len(source)`, `source[i]` -> a raw record dict and `source.h_div_w` (a float array, NaN where
the aspect ratio is unknown until the image is decoded). A raw record holds `image` (a path, encoded bytes, or a
decoded uint8 array), optionally `text`, `long_caption`, `label`, and always `id` (its index in the source).
Nothing is decoded here: that happens in the input pipeline's workers, where bad images are skipped and counted.

Layouts:
  jsonl         the official one (REFERENCE §3.8): `image_path` (relative to the jsonl's folder or absolute),
                `h_div_w`, `text`, optional `long_caption`, optional `label`; one or many files (glob).
  folder        a class-per-folder image tree (`root/<class>/*.png|jpg|…`); labels are the sorted class names.
  tfds          a TFDS dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow needed),
                e.g. imagenet2012 built from the user's manual_dir.
  array_record  shards written by `python -m infinity_jax.data.write_records` (msgpack records plus index.json).
"""

from __future__ import annotations

import glob
import json
import os

import msgpack
import numpy as np
from PIL import Image

from infinity_jax.config import DATA_SOURCES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class JsonlSource:
    """The official jsonl layout. A line without a required key fails here, naming its file and line."""

    def __init__(self, pattern: str, required: tuple[str, ...] = ("image_path", "h_div_w")):
        files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not files or not all(os.path.isfile(f) for f in files):
            raise FileNotFoundError(f"no jsonl file at {pattern!r}")
        self.records, aspect = [], []
        for path in files:
            folder = os.path.dirname(os.path.abspath(path))
            with open(path) as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
                    missing = [k for k in required if k not in item]
                    if missing:
                        raise ValueError(
                            f"{path}:{line_number}: missing key(s) {', '.join(missing)} "
                            f"(a line needs {', '.join(required)}; has {', '.join(item) or 'nothing'})"
                        )
                    record = {"image": os.path.join(folder, item["image_path"])}
                    record.update({k: item[k] for k in ("text", "long_caption", "label") if k in item})
                    self.records.append(record)
                    aspect.append(float(item.get("h_div_w", np.nan)))
        self.h_div_w = np.asarray(aspect, np.float64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {**self.records[index], "id": int(index)}


class FolderSource:
    """`root/<class>/<image>`; aspect ratios come from the image headers (no decoding)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"{root!r} has no class subfolders (expected root/<class>/<image>)")
        self.records, aspect = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            for file in sorted(os.listdir(folder)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(folder, file)
                    self.records.append({"image": path, "label": label})
                    aspect.append(_header_aspect(path))
        if not self.records:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.h_div_w = np.asarray(aspect, np.float64)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {**self.records[index], "id": int(index)}


def _header_aspect(path: str) -> float:
    try:
        with Image.open(path) as image:
            width, height = image.size
        return height / width
    except (OSError, ValueError, ZeroDivisionError, Image.DecompressionBombError):
        return np.nan  # unreadable: decided (and counted as skipped) when it is loaded


class TfdsSource:
    """`tfds.data_source(name, split, data_dir)`; `image` arrives decoded. Caption keys are configurable."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key="image", label_key="label", text_key=""):
        import tensorflow_datasets as tfds

        self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self.keys = {"image": image_key, "label": label_key, "text": text_key}
        self.h_div_w = np.full(len(self.source), np.nan)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        item = self.source[int(index)]
        record = {"id": int(index)}
        for ours, theirs in self.keys.items():
            if theirs and theirs in item:
                value = item[theirs]
                record[ours] = value.decode() if isinstance(value, bytes) and ours == "text" else value
        return record


class ArrayRecordSource:
    """Shards written by `write_records`: `index.json` (files, h_div_w) next to `*.array_record` files."""

    def __init__(self, folder: str):
        import grain

        index_path = os.path.join(folder, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"{index_path} not found: write shards with python -m infinity_jax.data.write_records"
            )
        with open(index_path) as f:
            index = json.load(f)
        self.source = grain.sources.ArrayRecordDataSource([os.path.join(folder, p) for p in index["files"]])
        self.h_div_w = np.asarray([np.nan if x is None else x for x in index["h_div_w"]], np.float64)
        if len(self.source) != len(self.h_div_w):
            raise ValueError(f"{index_path} lists {len(self.h_div_w)} records, the shards hold {len(self.source)}")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = msgpack.unpackb(self.source[int(index)])
        return {**record, "id": int(index)}


class Subset:
    """The records of `source` at `indices`; records keep their ids in the full source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.h_div_w = source.h_div_w[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]


def split_holdout(source, every: int):
    """(train, held_out): every `every`-th record (ids 0, every, 2·every, …) is held out; every ≤ 0 holds out none.

    A fixed rule of the record's position, so that the split is the same on every process, on every resume and
    for every model trained on the source.
    """
    if every <= 0:
        return source, None
    if every == 1 or len(source) < 2 * every:
        raise ValueError(
            f"data.holdout_every={every} leaves no training data or no held-out data ({len(source)} records)"
        )
    ids = np.arange(len(source))
    held = ids % every == 0
    return Subset(source, ids[~held]), Subset(source, ids[held])


def make_source(data):
    """The source named by the `data` config section (`data.source` is one of DATA_SOURCES)."""
    if data.source == "jsonl":
        return JsonlSource(data.path)
    if data.source == "folder":
        return FolderSource(data.path)
    if data.source == "tfds":
        return TfdsSource(data.tfds_name, data.split, data.path, text_key=data.tfds_text_key)
    if data.source == "array_record":
        return ArrayRecordSource(data.path)
    raise ValueError(f"unknown data.source {data.source!r}; valid: {', '.join(DATA_SOURCES)}")
