"""Writes a jsonl or class-folder dataset as array_record shards that `data.source=array_record` reads.

    python -m infinity_jax.data.write_records --source jsonl --path data/train.jsonl --out data/train_ar
    python -m infinity_jax.data.write_records --source folder --path imagenet/train --out data/in_ar --shard_size 5000

Each record is msgpack: the image file's bytes as they are (not re-encoded), text, long_caption, label. `index.json`
lists the shard files and every record's h/w (for bucketing by template without decoding). Records whose image
file is missing or unreadable are written anyway and skipped (and counted) at training time, like the originals.
"""

from __future__ import annotations

import json
import os

import msgpack
from absl import app, flags

from infinity_jax.data import sources


def write_records(source, out: str, shard_size: int = 10_000) -> dict:
    """Writes `source` (a JsonlSource or FolderSource) under `out`. Returns the index written to index.json."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out, exist_ok=True)
    files, writer = [], None
    for i in range(len(source)):
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            files.append(f"records-{len(files):05d}.array_record")
            writer = ArrayRecordWriter(os.path.join(out, files[-1]), "group_size:1")
        record = {k: v for k, v in source[i].items() if k != "id"}
        try:
            with open(record["image"], "rb") as f:
                record["image"] = f.read()
        except OSError:
            record["image"] = b""  # kept, so that the skip is counted at training time
        writer.write(msgpack.packb(record))
    if writer is not None:
        writer.close()
    index = {"files": files, "h_div_w": [None if x != x else float(x) for x in source.h_div_w]}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    return index


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.path or not f.out:
        raise app.UsageError("--path and --out are required")
    source = sources.JsonlSource(f.path) if f.source == "jsonl" else sources.FolderSource(f.path)
    index = write_records(source, f.out, f.shard_size)
    print(f"wrote {len(index['h_div_w'])} records in {len(index['files'])} shard(s) to {f.out}")


if __name__ == "__main__":
    # Defined only when run as a program: other tools define --out too, and tests import them all.
    flags.DEFINE_enum("source", "jsonl", ["jsonl", "folder"], "Layout of the input dataset.")
    flags.DEFINE_string("path", None, "The jsonl file (glob) or the class-folder root.")
    flags.DEFINE_string("out", None, "Output folder for the shards and index.json.")
    flags.DEFINE_integer("shard_size", 10_000, "Records per shard.")
    app.run(main)
