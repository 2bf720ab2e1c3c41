"""Captions -> T5 token ids on the host (the T5 encoder itself runs on device: `models.t5`).

As the official pipeline (REFERENCE §3.3): pad to `max_length` with the pad id, truncate longer captions, the EOS
token kept; the mask marks the real tokens (EOS included). The encoder then sees padded features plus the mask,
which is equivalent to the official packing of `sum(mask)` rows per caption.
"""

from __future__ import annotations

import os

import numpy as np


def tokenizer_path(config) -> str:
    """Where a config's T5 tokenizer is: `text.tokenizer`, else the T5 checkpoint folder."""
    path = config.text.tokenizer or config.text.checkpoint
    if not path or path == "random":
        raise ValueError("set text.tokenizer: a Hugging Face model folder or a T5 tokenizer.json")
    return path


def load_text_tokenizer(path: str):
    """A Hugging Face tokenizer from a model folder (as downloaded, e.g. google/flan-t5-xl) or a tokenizer.json."""
    from transformers import AutoTokenizer, T5TokenizerFast

    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(path) and path.endswith(".json"):
        return T5TokenizerFast(tokenizer_file=path)
    raise FileNotFoundError(f"no tokenizer at {path!r}: give a model folder or a tokenizer.json file")


def tokenize(tokenizer, captions, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """captions: list of N strings -> (tokens int32 [N, max_length], mask bool [N, max_length])."""
    encoded = tokenizer(
        list(captions), max_length=max_length, padding="max_length", truncation=True, return_tensors="np"
    )
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"] > 0
