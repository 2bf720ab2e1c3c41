"""Runs the frozen towers once over a dataset and writes their outputs as array_record shards.

    python -m infinity_jax.data.precompute --config configs/infinity.py:size=2b,res=0.25M --out data/latents \
        --config.data.path=train.jsonl --config.tokenizer.checkpoint=infinity_vae_d32reg.pth \
        --config.text.checkpoint=flan-t5-xl/
    python -m infinity_jax.train --config ... --config.data.source=array_record --config.data.path=data/latents \
        --config.data.precomputed=True

Each record holds the tokenizer's raw latent (float32 [h, w, d], before quantization: Bitwise Self-Correction
still draws new flips every step) and, for text, T5 features of the short and the long caption (their real rows
only; float16 when the encoder runs in bf16, which is lossless, else float32), plus label and h/w. The training
step then skips the encoders. Unusable images are skipped with a warning and counted in the summary.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import msgpack
import numpy as np
from absl import flags

from infinity_jax import cli, schedules, sharding
from infinity_jax import config as config_lib
from infinity_jax.data import pipeline, sources
from infinity_jax.models.t5 import T5Encoder, get_t5_layout
from infinity_jax.text import load_text_tokenizer, tokenize, tokenizer_path
from infinity_jax.train import frozen

_log = logging.getLogger("infinity_jax.data")


def _text_encoder(config):
    module = T5Encoder(get_t5_layout(config.text.layout), jax.numpy.dtype(config.text.dtype))
    return jax.jit(lambda params, tokens, mask: module.apply({"params": params}, tokens, mask))


def precompute(config: ml_collections.ConfigDict, out: str, batch_size: int = 32) -> dict:
    """Writes the records and `index.json` under `out`. Returns the index."""
    from array_record.python.array_record_module import ArrayRecordWriter

    mesh = sharding.make_mesh(num_devices=1)
    tokenizer = frozen.load_tokenizer(config, mesh, ())
    text = config.model.cond == "text"
    if text:
        t5_params = frozen.load_text_encoder(config, mesh, ())
        t5, t5_tokenizer = _text_encoder(config), load_text_tokenizer(tokenizer_path(config))
    # bf16 features fit float16 exactly (same range here, more mantissa); float32 features stay float32.
    feature_dtype = np.float16 if text and config.text.dtype == "bfloat16" else np.float32
    encode = jax.jit(type(tokenizer).encode)
    source = sources.make_source(config.data)
    buckets = pipeline.assign_templates(source.h_div_w, config_lib.templates(config), config.data.default_template)
    os.makedirs(out, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(out, "records-00000.array_record"), "group_size:1")
    aspect, skipped = [], 0

    def features(captions):
        tokens, mask = tokenize(t5_tokenizer, captions, config.text.max_length)
        values = np.asarray(jax.device_get(t5(t5_params, tokens, mask)), np.float32)
        return [v[: m.sum()].astype(feature_dtype) for v, m in zip(values, mask, strict=True)]

    for template in np.unique(buckets):
        size = schedules.infinity_schedule(float(template), config.schedule.resolution).pixel_size
        indices = np.flatnonzero(buckets == template)
        for start in range(0, len(indices), batch_size):
            raws, pixels = [], []
            for index in indices[start : start + batch_size]:
                raw = source[int(index)]
                if text and not str(raw.get("text") or "").strip():
                    _log.warning("skipping record %s: empty caption", index)
                    skipped += 1
                    continue
                try:
                    image = pipeline.read_image(raw.get("image"), size, config.data.min_size, config.data.max_pixels)
                except pipeline.BadRecord as error:
                    _log.warning("skipping record %s: %s", index, error)
                    skipped += 1
                    continue
                raws.append(raw)
                pixels.append(image)
            if not raws:
                continue
            batch = np.zeros((batch_size, *size, 3), np.float32)  # one compiled shape per template
            batch[: len(pixels)] = np.stack(pixels).astype(np.float32) / 127.5 - 1.0
            latents = np.asarray(jax.device_get(encode(tokenizer, batch)))[: len(raws)]
            if text:
                short = features([r.get("text") or " " for r in raws])
                long = features([r.get("long_caption") or r.get("text") or " " for r in raws])
            for i, raw in enumerate(raws):
                record = {"latent": pipeline.save_array(latents[i]), "source_id": int(raw["id"])}
                record.update({k: raw[k] for k in ("text", "long_caption", "label") if k in raw})
                if text:
                    record["text_features"] = pipeline.save_array(short[i])
                    if raw.get("long_caption"):
                        record["long_text_features"] = pipeline.save_array(long[i])
                writer.write(msgpack.packb(record))
                aspect.append(float(template))
    writer.close()
    index = {"files": ["records-00000.array_record"], "h_div_w": aspect, "precomputed": True, "skipped": skipped}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    return index


def main(config):
    out, batch_size = flags.FLAGS.out, flags.FLAGS.batch_size
    if not out:
        raise SystemExit("error: --out is required")
    index = precompute(config, out, batch_size)
    print(f"wrote {len(index['h_div_w'])} records to {out} ({index['skipped']} unusable images skipped)")


if __name__ == "__main__":
    # Defined only when run as a program: other tools define --out too, and tests import them all.
    flags.DEFINE_string("out", None, "Output folder for the records and index.json.")
    flags.DEFINE_integer("batch_size", 32, "Images encoded per call.")
    cli.run(main)
