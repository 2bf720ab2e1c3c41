"""The device mesh and the logical-axis rules that map parameter and activation names onto it.

One mesh with axes ("data", "fsdp", "tensor"). Modules name their axes logically (`act_batch`, `embed`, …); a
rules list maps names to mesh axes, so the same model runs replicated, FSDP or tensor-parallel by changing rules,
not code. Frozen towers (the tokenizer, T5) have their own rules: by default their weights are replicated and
only the batch is split.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# The frozen tokenizer: batch over every data-parallel axis, weights and spatial axes replicated.
TOKENIZER_RULES = (("act_batch", ("data", "fsdp")),)

# The transformer: FSDP shards the model width over "fsdp", tensor parallelism splits heads and the FFN's hidden
# width over "tensor". A kernel never names two axes that map to the same mesh axis ("embed_out", the second
# width axis of square projections, and "text_embed" stay unsharded).
TRANSFORMER_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    num_devices: int = -1,
):
    """A ("data", "fsdp", "tensor") mesh over `devices` (all by default, or the first `num_devices` of them);
    one axis may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices > 0:
        if num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data×fsdp×tensor with fixed part {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {np.prod(sizes)} devices, have {len(devices)}"
        )
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(tree, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for a tree whose leaves carry logical partitioning (e.g. `jax.eval_shape(model.init, …)`).

    Leaves without logical names are replicated.
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)


def abstract_arrays(boxed, mesh: jax.sharding.Mesh, rules, dtype=None):
    """ShapeDtypeStructs (unboxed) carrying the NamedShardings `rules` give a logically partitioned abstract tree
    (e.g. `jax.eval_shape` of an init): the target of a sharded init, restore or ahead-of-time compile.
    `dtype` overrides every leaf's dtype."""
    shardings = logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
