"""Shared machinery of the converters: reading PyTorch files and mapping named tensors onto a parameter tree.

The official loader (`load_state_dict(strict=False)`) silently skips names it does not know. Ours checks every
name and every shape and fails with the complete list of what is missing, unexpected or misshapen.
"""

from __future__ import annotations

import dataclasses
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
    """How one parameter leaf is filled: from the first present source name, through `transform`."""

    target: tuple[str, ...]
    sources: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = np.asarray


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
    shapes = {
        tuple(getattr(k, "key", getattr(k, "name", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params))[0]
    }
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
