"""FLOPs of a JAX program, counted from its jaxpr: matrix products and convolutions, 2 per multiply-add.

XLA's `cost_analysis()` on GPU does not count convolutions that become cuDNN calls, and it counts whatever the
compiler emitted rather than what the model asks for. Counting the traced program instead gives the same number
on every backend, which is what MFU needs. Element-wise work (norms, activations, softmax) is not counted:
it is small next to the products, and MFU conventions leave it out.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core

# Dense bf16 peak FLOP/s of one chip (datasheets), by jax device_kind ("TPU v5" is v5p; "lite" kinds first, the
# lookup takes the first name contained in the kind); MFU is reported against it.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12,
              "TPU v5": 459e12, "TPU v4": 275e12}  # fmt: skip


def peak_flops(device) -> float | None:
    """The chip's peak bf16 FLOP/s, or None when unknown (e.g. CPU)."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    contracted = math.prod(lhs.shape[i] for i in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # Per output element: one multiply-add per kernel entry of its group (in-features/groups × window).
    per_output = math.prod(rhs.shape) / rhs.shape[out_feature_dim]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr) -> float:
    """FLOPs of a (closed) jaxpr; scans count `length` times, conditionals count their costliest branch, Pallas
    kernels their `CostEstimate`."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "pallas_call":  # a kernel counts what its author declared
            estimate = eqn.params.get("cost_estimate")
            total += estimate.flops if estimate is not None else 0.0
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def count_flops(fn, *args, **kwargs) -> float:
    """FLOPs of fn(*args, **kwargs) (arrays or ShapeDtypeStructs; nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
