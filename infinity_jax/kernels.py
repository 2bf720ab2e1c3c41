"""What a compiled XLA program launches, read from its optimized HLO text: kernels per call by family, the bytes
each family writes, and the size of its collectives.

On a GPU every fusion, library call (cuBLAS, cuDNN, a Pallas/Triton kernel), copy and collective is one kernel
launch; a while loop's body runs once per trip. Counting them from a deviceless compile (`infinity_jax.aot` with an
`h100:`/`h200:` topology) shows, on a CPU host, how many launches a generation scale or a train step costs and
where the copies are: the part of a profile that does not need the GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# Instructions that launch nothing: bookkeeping, control flow (counted through its bodies), and the second halves
# of asynchronous pairs (their "-start" is the launch).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-update",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "send-done", "recv-done",
         "async-done", "all-to-all-done", "reduce-scatter-done"}  # fmt: skip
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}  # fmt: skip

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SOURCE = re.compile(r'op_name="([^"]*)"')
# How many of a program's kernels, the heaviest writers first, an inventory keeps by name.
HEAVIEST = 12


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launching instruction of the optimized HLO, over all the times a call runs it."""

    name: str  # the HLO instruction
    family: str
    launches: int
    written: int  # bytes, over all its launches
    shape: str  # its output shape text
    source: str  # the JAX op it came from (metadata op_name), where XLA kept one

    def line(self) -> str:
        return (f"{self.written / 2**30:7.2f} GiB {self.launches:6d}× {self.family:10s} {self.name} "
                f"{self.shape[:60]} {self.source[-90:]}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Inventory:
    launches: dict[str, int]  # family -> kernels launched per call
    written: dict[str, int]  # family -> bytes its kernels write per call (outputs; not library workspaces)
    collective_bytes: int  # per call and device: each collective's largest buffer, summed
    unknown_trips: int  # while loops whose trip count XLA did not record (counted once)
    heaviest: tuple[Kernel, ...] = ()  # the HEAVIEST kernels by bytes written per call, most first

    @property
    def total(self) -> int:
        return sum(self.launches.values())

    def line(self) -> str:
        families = ", ".join(f"{k} {v} ({self.written.get(k, 0) / 2**30:.2f} GiB written)"
                             for k, v in sorted(self.launches.items(), key=lambda kv: -kv[1]))  # fmt: skip
        unknown = f"; {self.unknown_trips} loops of unknown trip count counted once" if self.unknown_trips else ""
        return (f"kernels launched per call: {self.total} ({families}); collectives over "
                f"{self.collective_bytes / 2**30:.3f} GiB per device{unknown}")  # fmt: skip


def family(opcode: str, rest: str) -> str:
    """The kernel family of one launching instruction (its opcode and the text after it)."""
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1) if target else ""
        if "cublas" in target:
            return "gemm"
        if "fmha" in target:
            return "attention"
        if "conv" in target:
            return "conv"
        if "triton" in target.lower():
            return "pallas"
        return "custom"
    if opcode.startswith(_COLLECTIVES):
        return opcode.removesuffix("-start")  # each collective its own family: all-gather, reduce-scatter, ...
    if opcode == "async-start":
        return "collective"
    if opcode in ("copy", "copy-start", "dynamic-slice", "slice", "dynamic-update-slice"):
        return "copy/slice"
    if opcode == "fusion":
        calls = re.search(r"calls=%(\S+?)[,\s]", rest + " ")
        name = calls.group(1) if calls else ""
        if "gemm" in name or '"__triton_gemm"' in rest or "cublas" in rest:
            return "gemm"
        if "fmha" in rest or "cudnn" in name:
            return "attention"
        # XLA names a fusion after its ops ("fused_dynamic_slice", "wrapped_slice_computation"): one that only
        # moves data is a copy, whatever small arithmetic rides along.
        if re.search(r"(^|_)(copy|slice|dynamic_slice|dynamic_update_slice)(_|$|\.)", name.split(".")[0]):
            return "copy/slice"
        return "fusion"
    return opcode


def _arrays(shape_text: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of each array in a (tuple) shape such as "(bf16[8,64]{1,0}, u8[0]{0})"."""
    return [(dtype, _BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shape_text)]  # fmt: skip


def _output_bytes(shape_text: str) -> int:
    """The bytes of a kernel's outputs; the u8/s8 scratch that cuBLAS and cuDNN calls return is not data."""
    return sum(size for dtype, size in _arrays(shape_text) if dtype not in ("u8", "s8"))


def _written_bytes(opcode: str, shape: str, rest: str, bodies: dict, shapes: dict[str, str]) -> int:
    """A kernel's output bytes; an in-place update of a buffer (a dynamic-update-slice, e.g. into a KV cache)
    writes only its update's worth, not the whole buffer it returns."""
    if opcode == "dynamic-update-slice":
        updates = [rest]
    else:
        calls = re.search(r"calls=%([^,\s]+)", rest) if opcode == "fusion" else None
        inner = bodies.get(calls.group(1), ()) if calls else ()
        updates = [operands for _, op, _, operands in inner if op == "dynamic-update-slice"]
    if not updates:
        return _output_bytes(shape)
    names = [re.findall(r"%([^,\s)]+)", operands.split(")")[0]) for operands in updates]
    return sum(_output_bytes(shapes.get(operands[1], "")) for operands in names if len(operands) > 1)


def _largest_array_bytes(shape_text: str) -> int:
    """The largest buffer of a (tuple) shape: an all-gather's output, a reduce-scatter's input."""
    return max((size for _, size in _arrays(shape_text)), default=0)


def inventory(hlo_text: str) -> Inventory:
    """Kernels launched by one call of the program whose optimized HLO is `hlo_text` (`compiled.as_text()`)."""
    bodies: dict[str, list[tuple[str, str, str, str]]] = {}  # computation -> (name, opcode, shape, operands…)
    shapes: dict[str, str] = {}  # instruction name -> its shape text (names are unique in a module)
    entry, current = None, None
    for line in hlo_text.splitlines():
        if match := _COMPUTATION.match(line):
            current = match.group(2)
            bodies[current] = []
            entry = current if match.group(1) else entry
        elif current is not None and (match := _INSTRUCTION.match(line)):
            bodies[current].append(match.group(1, 3, 2, 4))
            shapes[match.group(1)] = match.group(2)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text: pass compiled.as_text() of a compiled program")

    launches: collections.Counter = collections.Counter()
    written: collections.Counter = collections.Counter()
    totals = {"bytes": 0, "unknown": 0}
    kernels: dict[str, Kernel] = {}

    def walk(name: str, times: int):
        for instruction, opcode, shape, rest in bodies.get(name, ()):
            if opcode == "while":
                trip = _TRIP.search(rest)
                totals["unknown"] += trip is None
                trips = int(trip.group(1)) if trip else 1
                walk(re.search(r"body=%([^,\s]+)", rest).group(1), times * trips)
                walk(re.search(r"condition=%([^,\s]+)", rest).group(1), times * (trips + 1))
            elif opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = re.findall(r"%([^,\s]+)", branches.group(1)) if branches else re.findall(
                    r"(?:true|false)_computation=%([^,\s]+)", rest)  # fmt: skip
                for branch in names[:1]:  # one branch runs; the first stands for all
                    walk(branch, times)
            elif opcode == "call":
                walk(re.search(r"to_apply=%([^,\s]+)", rest).group(1), times)
            elif opcode not in _FREE:
                kind = family(opcode, rest)
                size = times * _written_bytes(opcode, shape, rest, bodies, shapes)
                launches[kind] += times
                written[kind] += size
                seen = kernels.get(instruction)
                source = _SOURCE.search(rest)
                kernels[instruction] = Kernel(instruction, kind, times + (seen.launches if seen else 0),
                                              size + (seen.written if seen else 0), shape,
                                              source.group(1) if source else "")  # fmt: skip
                if kind == "collective" or kind.startswith(_COLLECTIVES):
                    totals["bytes"] += times * _largest_array_bytes(shape)

    walk(entry, 1)
    heaviest = tuple(sorted(kernels.values(), key=lambda k: -k.written)[:HEAVIEST])
    return Inventory(dict(launches), dict(written), totals["bytes"], totals["unknown"], heaviest)
