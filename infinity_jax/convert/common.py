"""Shared machinery of the converters: reading PyTorch files and mapping named tensors onto a parameter tree, and
back.

The official loader (`load_state_dict(strict=False)`) silently skips names it does not know. Ours checks every
name and every shape and fails with the complete list of what is missing, unexpected or misshapen. Each rule also
knows its inverse, so that our parameters can be written back under the official names (`export_rules`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model; lists every missing, unexpected and misshapen entry."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str], misshapen: Sequence[str]):
        self.missing, self.unexpected, self.misshapen = list(missing), list(unexpected), list(misshapen)
        parts = []
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if names:
                parts.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
        super().__init__("checkpoint does not match the model:\n" + "\n".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter leaf is filled: from the first present source name, through `transform`; exporting
    writes `inverse(leaf)` under the first source name."""

    target: tuple[str, ...]
    sources: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray
    inverse: Callable[[np.ndarray], np.ndarray] = np.asarray


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any dtype, incl. bf16) or array -> numpy (bf16 -> float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def apply_rules(
    state_dict: Mapping[str, object],
    rules: Sequence[Rule],
    abstract_params,
    ignore: Callable[[str], bool] = lambda name: False,
    dtype=np.float32,
):
    """Builds a parameter tree shaped like `abstract_params` from `state_dict` by `rules`.

    Args:
      state_dict: official names -> tensors/arrays.
      rules: one per leaf of `abstract_params`.
      abstract_params: the model's parameters or their shapes (e.g. from `jax.eval_shape`), boxed or not.
      ignore: names that are known non-parameters (buffers) and may be present.
      dtype: dtype of the returned arrays.

    Raises:
      CheckpointMismatchError listing every missing, unexpected and misshapen entry.
    """
    shapes = {path: tuple(leaf.shape) for path, leaf in leaf_paths(abstract_params)}
    if sorted(shapes) != sorted(r.target for r in rules):
        raise AssertionError("converter rules do not cover the model's parameters exactly")  # a bug of ours
    used, missing, misshapen, flat = set(), [], [], {}
    for rule in rules:
        present = [s for s in rule.sources if s in state_dict]
        if not present:
            missing.append(" or ".join(rule.sources))
            continue
        used.update(present)
        value = rule.transform(to_numpy(state_dict[present[0]]))
        if tuple(value.shape) != shapes[rule.target]:
            misshapen.append(
                f"{present[0]}: {tuple(to_numpy(state_dict[present[0]]).shape)} converts to {tuple(value.shape)}, "
                f"model {'/'.join(rule.target)} needs {shapes[rule.target]}"
            )
            continue
        flat[rule.target] = np.asarray(value, dtype)
    unexpected = sorted(name for name in state_dict if name not in used and not ignore(name))
    if missing or unexpected or misshapen:
        raise CheckpointMismatchError(sorted(missing), unexpected, sorted(misshapen))
    params: dict = {}
    for path, value in flat.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return params


def leaf_paths(tree) -> list[tuple[tuple[str, ...], object]]:
    """(path of dict keys, leaf) of every leaf of a (possibly boxed) parameter tree."""
    return [
        (tuple(getattr(k, "key", getattr(k, "name", k)) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    ]


def export_rules(params, rules: Sequence[Rule], dtype=None) -> dict[str, np.ndarray]:
    """Our parameters -> {official name: array} by the inverse of each rule (the first source name is written)."""
    flat = dict(leaf_paths(params))
    if sorted(flat) != sorted(r.target for r in rules):
        missing = sorted(set(r.target for r in rules) - set(flat))
        extra = sorted(set(flat) - set(r.target for r in rules))
        raise ValueError(f"parameters do not fit the layout: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for rule in rules:
        value = rule.inverse(np.asarray(jax.device_get(flat[rule.target]), np.float32))
        out[rule.sources[0]] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
    return out


def weight_files(folder: str) -> list[str]:
    """The weight files of a (possibly sharded) checkpoint folder: the shards an `*.index.json` names, else
    `model.safetensors` / `pytorch_model.bin` / any `*.safetensors` / any `*.pth`."""
    indexes = sorted(glob.glob(os.path.join(folder, "*.index.json")))
    if indexes:
        with open(indexes[0]) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} names shards that are not in {folder}: {', '.join(missing)}")
        return [os.path.join(folder, s) for s in shards]
    for pattern in ("model.safetensors", "pytorch_model.bin", "*.safetensors", "*.pth", "*.bin"):
        found = sorted(glob.glob(os.path.join(folder, pattern)))
        if found:
            return found
    raise FileNotFoundError(f"no weights (*.index.json, *.safetensors, *.bin or *.pth) in {folder}")


def read_state_dict(path: str, containers: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A checkpoint file (see `load_torch_state_dict`) or a folder of shards (see `weight_files`) -> one dict.
    A name stored in two shards is an error."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        return load_torch_state_dict(path, containers)
    merged: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        part = load_torch_state_dict(file, containers)
        twice = sorted(set(part) & set(merged))
        if twice:
            raise ValueError(f"{file} repeats names of earlier shards: {', '.join(twice[:10])}")
        merged.update(part)
    return merged


def save_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Writes {name: array} as `.safetensors` or, with torch, as a `.pth` of tensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
        return
    try:
        import torch
    except ImportError as error:
        raise ImportError("writing .pth files needs torch (or write .safetensors)") from error
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


def load_torch_state_dict(path: str, containers: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Reads a `.pth`/`.pt` (or `.safetensors`) file into {name: numpy array}.

    Args:
      path: the file.
      containers: keys to descend into when present, in order (e.g. ("vae",) or ("trainer", "gpt_fsdp")).
    """
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading .pth checkpoints needs torch: pip install 'infinity_jax[torch]'") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in containers:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {name: to_numpy(value) for name, value in state.items() if hasattr(value, "shape")}


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d [O, I, kh, kw] -> flax [kh, kw, I, O]."""
    return np.transpose(weight, (2, 3, 1, 0)) if weight.ndim == 4 else weight


def torch_conv_weight(kernel: np.ndarray) -> np.ndarray:
    """flax [kh, kw, I, O] -> torch Conv2d [O, I, kh, kw] (the inverse of `conv_kernel`)."""
    return np.transpose(kernel, (3, 2, 0, 1)) if kernel.ndim == 4 else kernel
