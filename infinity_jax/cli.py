"""Command-line plumbing shared by every entry point: the `--config` flag and clear errors for bad configs.

absl's `config_flags` fails deep inside ml_collections with a bare `AttributeError: 'x'` when an override names
a key that does not exist; `run` turns that into one line that names the key and lists the valid ones, and runs
`config.validate` before the program starts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from infinity_jax import config as config_lib

CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file with optional arguments, e.g. configs/infinity.py:size=tiny,res=0.06M.",
    lock_config=True,
)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads "path/to/config.py[:arg]" the way `config_flags` does (get_config(arg) or get_config())."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_infinity_jax_config", path)
    if module_spec is None:
        raise ValueError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """A message for the first `--config.a.b=v` whose key path does not exist in `config`, else None."""
    for a in argv:
        if not a.startswith("--config."):
            continue
        path = a[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(walked) or "the config"
                valid = ", ".join(node.keys()) if isinstance(node, ml_collections.ConfigDict) else "(a leaf)"
                return f"unknown config key {path!r}: {part!r} is not in {where}; valid keys there: {valid}"
            node, walked = node[part], [*walked, part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        spec = _config_spec(argv)
        message = unknown_override(load_config_file(spec), argv) if spec else None
        raise SystemExit(f"error: {message or error}") from None


def run(main: Callable[[ml_collections.ConfigDict], None]) -> None:
    """Parses flags, loads and validates `--config`, then calls main(config)."""

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if CONFIG.value is None:
            raise app.UsageError("--config is required, e.g. --config configs/infinity.py:size=tiny")
        try:
            config_lib.validate(CONFIG.value)
        except ValueError as error:
            sys.exit(f"error: {error}")
        main(CONFIG.value)

    app.run(_main, flags_parser=_parse_flags)


def train_in(
    train: Callable[[ml_collections.ConfigDict, str], None], config: ml_collections.ConfigDict, workdir: str | None
) -> None:
    """A trainer entry point's train(config, workdir), refused with one line when `--workdir` was not given."""
    if not workdir:
        raise SystemExit("error: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    cache_compilations(workdir)
    train(config, workdir)


def cache_compilations(workdir: str) -> None:
    """Keeps a run's compiled programs in `workdir/xla_cache` (JAX's persistent compilation cache), so that a
    resumed or restarted run loads its step instead of compiling it again: minutes for a 2B model with unrolled
    blocks on a GPU host. A cache directory already chosen (JAX_COMPILATION_CACHE_DIR) is left as it is."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla_cache"))
