"""The input pipeline on real image files: sources, bucketing, host sharding, resumable order, and bad data."""

import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from infinity_jax import config as config_lib
from infinity_jax.cli import load_config_file
from infinity_jax.data import pipeline, sources
from infinity_jax.data.write_records import write_records
from infinity_jax.text import load_text_tokenizer

SET = "tests/assets/emoji3d/set"
TOKENIZER = load_text_tokenizer("tests/assets/t5_tokenizer/tokenizer.json")


def _spec(cond="text", batch=4, **kw):
    return pipeline.InputSpec("0.004M", cond, batch, text_tokenizer=TOKENIZER, max_length=16, **kw)


def _copy_set(tmp_path, rows=None):
    """A writable copy of the test set; `rows` replaces the jsonl lines."""
    root = tmp_path / "set"
    shutil.copytree(SET, root)
    if rows is not None:
        with open(root / "metadata.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def _rows():
    with open(f"{SET}/metadata.jsonl") as f:
        return [json.loads(line) for line in f]


def test_jsonl_batches_have_static_shapes_and_real_pixels():
    source = sources.JsonlSource(f"{SET}/metadata.jsonl")
    batch = next(iter(pipeline.make_dataset(source, _spec())))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["tokens"].shape == (4, 16) and batch["text_mask"].dtype == bool
    assert (batch["tokens"][:, 0] != 0).all() and batch["skipped"].sum() == 0
    assert batch["image"].std() > 10 and (batch["image"] == 255).any()  # white background from the alpha channel


def test_jsonl_line_with_missing_key_names_file_and_line(tmp_path):
    rows = _rows()
    del rows[4]["h_div_w"]
    root = _copy_set(tmp_path, rows)
    with pytest.raises(ValueError, match=r"metadata.jsonl:5: missing key\(s\) h_div_w"):
        sources.JsonlSource(str(root / "metadata.jsonl"))


def test_buckets_by_template_one_shape_per_batch(tmp_path):
    root = _copy_set(tmp_path)
    rows = _rows()
    for row in rows[:8]:  # make 8 images tall: 64x48 -> h/w 1.333 template
        path = root / row["image_path"]
        Image.open(path).convert("RGBA").resize((48, 64)).save(path)
        row["h_div_w"] = 64 / 48
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    source = sources.JsonlSource(str(root / "metadata.jsonl"))
    iterator = iter(pipeline.make_dataset(source, _spec(templates=(1.0, 1.333))))
    shapes = set()
    for _ in range(12):
        batch = next(iterator)
        assert len(set(batch["template"].tolist())) == 1
        tall = set(batch["id"].tolist()) <= set(range(8))
        assert tall == (batch["template"][0] == np.float32(1.333))
        shapes.add(batch["image"].shape)
    # 1.333 at 0.004M is the (4, 3) grid: 64x48 pixels.
    assert shapes == {(4, 64, 64, 3), (4, 64, 48, 3)}


def test_processes_read_disjoint_records_and_epochs_reshuffle():
    source = sources.JsonlSource(f"{SET}/metadata.jsonl")
    seen = []
    for process in range(2):
        iterator = iter(pipeline.make_dataset(source, _spec(batch=6), process, 2))
        seen.append(np.concatenate([next(iterator)["id"] for _ in range(3)]))  # 9 records each: one epoch
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(18))
    iterator = iter(pipeline.make_dataset(source, _spec(batch=9)))
    first, second = next(iterator)["id"], next(iterator)["id"]
    third, fourth = next(iterator)["id"], next(iterator)["id"]
    assert sorted([*first, *second]) == sorted([*third, *fourth]) == list(range(18))
    assert [*first, *second] != [*third, *fourth]


def test_iterator_state_resumes_exactly():
    source = sources.JsonlSource(f"{SET}/metadata.jsonl")
    iterator = iter(pipeline.make_dataset(source, _spec(cond="class", batch=5)))
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["id"].tolist() for _ in range(3)]
    fresh = iter(pipeline.make_dataset(source, _spec(cond="class", batch=5)))
    fresh.set_state(state)
    assert [next(fresh)["id"].tolist() for _ in range(3)] == expected


class _CountingSource(sources.JsonlSource):
    """The jsonl source, counting the records the pipeline's reading threads look up."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_reading_threads_stay_within_their_read_ahead():
    source = _CountingSource(f"{SET}/metadata.jsonl")
    iterator = iter(pipeline.make_dataset(source, _spec(cond="class", batch=4, read_threads=2, read_ahead=1)))
    next(iterator)
    reads, deadline = -1, time.monotonic() + 10
    while source.reads != reads and time.monotonic() < deadline:  # until the threads have filled their buffer
        reads = source.reads
        time.sleep(0.5)
    # The batch taken, one batch ahead, and one record in each thread's hands; grain's default would read 500.
    assert 8 <= reads <= 4 + 4 + 2, reads
    config = load_config_file("configs/infinity.py:size=tiny")
    config.data.read_threads = 0
    with pytest.raises(ValueError, match=r"data\.read_threads=0 and data\.read_ahead=4 must be ≥ 1"):
        config_lib.validate(config)


def test_bad_records_are_skipped_counted_and_warned(tmp_path, caplog):
    root = _copy_set(tmp_path)
    rows = _rows()
    images = [root / r["image_path"] for r in rows]
    images[0].write_bytes(b"not an image at all")  # corrupt
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated
    os.remove(images[2])  # missing
    rows[3]["text"], rows[3]["long_caption"] = "  ", ""  # empty caption
    Image.new("RGB", (8, 8)).save(images[4], format="WEBP")  # tiny
    Image.new("RGB", (3000, 3000)).save(images[5], format="WEBP")  # huge for max_pixels below
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    source = sources.JsonlSource(str(root / "metadata.jsonl"))
    spec = _spec(batch=4, max_pixels=2000 * 2000, min_size=16)
    pipeline._WARNINGS.interval = 0.0  # one line per bad record here
    with caplog.at_level(logging.WARNING, logger="infinity_jax.data"):
        iterator = iter(pipeline.make_dataset(source, spec))
        batches = [next(iterator) for _ in range(3)]  # 12 good records out of 18: one pass over the epoch
    ids = np.concatenate([b["id"] for b in batches])
    assert not set(ids.tolist()) & set(range(6)) and len(set(ids.tolist())) == 12
    assert sum(int(b["skipped"].sum()) for b in batches) in range(1, 7)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for reason in ("cannot decode image", "file not found", "empty caption", "smaller than data.min_size",
                   "more than data.max_pixels"):  # fmt: skip
        assert reason in messages
    assert len(caplog.records) == sum(int(b["skipped"].sum()) for b in batches)


def test_all_bad_data_stops_with_a_clear_error(tmp_path, monkeypatch):
    root = _copy_set(tmp_path)
    for row in _rows():
        (root / row["image_path"]).write_bytes(b"garbage")
    monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_BAD", 20)
    source = sources.JsonlSource(str(root / "metadata.jsonl"))
    with pytest.raises(RuntimeError, match="20 consecutive records could not be used"):
        next(iter(pipeline.make_dataset(source, _spec())))


def test_folder_and_array_record_sources_give_the_same_examples(tmp_path):
    root = tmp_path / "folders"
    for row in _rows():
        os.makedirs(root / f"class_{row['label']}", exist_ok=True)
        shutil.copy(os.path.join(SET, row["image_path"]), root / f"class_{row['label']}")
    folder = sources.FolderSource(str(root))
    assert len(folder) == 18 and folder.classes[0] == "class_0" and np.allclose(folder.h_div_w, 1.0)
    index = write_records(folder, str(tmp_path / "ar"), shard_size=7)
    assert len(index["files"]) == 3
    records = sources.ArrayRecordSource(str(tmp_path / "ar"))
    spec = _spec(cond="class", batch=6)
    a, b = (next(iter(pipeline.make_dataset(s, spec))) for s in (folder, records))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["label"].tolist() == [folder[i]["label"] for i in a["id"]]


def test_tfds_array_record_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class Emoji(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(_rows()):
                path = os.path.join(SET, row["image_path"])
                rgb = Image.open(path).convert("RGB")
                rgb_path = tmp_path / f"{i}.png"
                rgb.save(rgb_path)
                yield i, {"image": str(rgb_path), "label": row["label"]}

    Emoji(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource("emoji", "train", str(tmp_path / "tfds"))
    batch = next(iter(pipeline.make_dataset(source, _spec(cond="class", batch=6))))
    assert batch["image"].shape == (6, 64, 64, 3) and batch["label"].max() < 10
