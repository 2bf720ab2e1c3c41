"""Timing and reporting shared by the benchmark scripts (run them as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import datetime
import statistics
import sys
import time

import jax

from infinity_jax.flops import peak_flops


def peak_tflops(device) -> float | None:
    peak = peak_flops(device)
    return peak / 1e12 if peak else None


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn() (device-synchronised) over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(title: str, description: str, table_lines: list[str], results: str | None) -> None:
    """Prints a dated markdown section (title, description, the command, the table) and appends it to `results`."""
    section = "\n".join(
        [f"### {title} ({datetime.date.today().isoformat()})", "", description, "",
         "Command: `python " + " ".join(sys.argv) + "`", "", *table_lines]
    ) + "\n"  # fmt: skip
    if results:
        with open(results, "a") as f:
            f.write("\n" + section)
    print(section)


def kernel_profile(fn, logdir: str, top: int = 16) -> list[str]:
    """Traces one call of fn() and sums the GPU time of its kernels by name.

    Returns markdown rows: total device ms, the timeline's idle time (`_idle_rows`), then the `top` kernels (ms,
    share, calls), and the share of each family (matmul, attention, fused element-wise, copies), so that a table
    explains where a step's time goes. Every kernel's total is also written to `logdir/kernels.tsv`.
    """
    import collections
    import glob
    import gzip
    import json
    import os

    jax.block_until_ready(fn())
    with jax.profiler.trace(logdir):
        jax.block_until_ready(fn())
    (path,) = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz")))[-1:]
    with gzip.open(path) as f:
        trace = json.load(f)
    devices = {
        e["pid"]
        for e in trace["traceEvents"]
        if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:GPU" in e["args"].get("name", "")
    }
    if not devices:  # say what the trace holds instead of an empty table
        names = [e["args"].get("name") for e in trace["traceEvents"] if e.get("name") == "process_name"]
        return [f"| no GPU in the trace; processes: {names} | | |"]
    events = sorted(
        (e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e),
        key=lambda e: e["ts"],
    )
    by_name, calls = collections.Counter(), collections.Counter()
    for e in events:
        by_name[e["name"]] += e["dur"] / 1e3
        calls[e["name"]] += 1
    total = sum(by_name.values()) or 1.0
    families = collections.Counter()
    for name, ms in by_name.items():
        families[_kernel_family(name)] += ms
    with open(os.path.join(logdir, "kernels.tsv"), "w") as f:  # every kernel, for reading beyond the top rows
        f.write("ms\tcalls\tfamily\tkernel\n")
        for name, ms in by_name.most_common():
            f.write(f"{ms:.4f}\t{calls[name]}\t{_kernel_family(name)}\t{name}\n")
    rows = [f"| device total | {total:.2f} ms | |", "|---|---|---|", *_idle_rows(events)]
    rows += [f"| {family} | {ms:.2f} ms | {ms / total:.0%} |" for family, ms in families.most_common()]
    rows += [
        f"| `{name[:70]}` | {ms:.2f} ms | {ms / total:.0%} ({calls[name]} calls) |"
        for name, ms in by_name.most_common(top)
    ]
    return rows


def _idle_rows(events: list[dict]) -> list[str]:
    """Where the GPU timeline of one call (trace events in time order, µs) is idle: the wait for its first kernel
    after the arguments' copies, the gaps next to memsets (libraries zeroing a workspace inside a CUDA graph), and
    the rest; and the kernel families the memsets precede."""
    import collections
    import itertools

    def is_copy(e):
        return "memcpy" in e["name"].lower()

    def is_memset(e):
        return "memset" in e["name"].lower()

    first = next((i for i, e in enumerate(events) if not is_copy(e)), len(events))
    gaps = [max(0.0, b["ts"] - a["ts"] - a["dur"]) for a, b in itertools.pairwise(events)]
    start_wait = gaps[first - 1] if 0 < first < len(events) else 0.0
    by_memset = sum(g for i, g in enumerate(gaps) if is_memset(events[i]) or is_memset(events[i + 1]))
    memsets = [i for i, e in enumerate(events) if is_memset(e)]
    before = collections.Counter(_kernel_family(events[i + 1]["name"]) for i in memsets if i + 1 < len(events))
    span = (events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]) / 1e3 if events else 0.0
    other = sum(gaps) - by_memset - start_wait
    return [
        f"| GPU span {span:.2f} ms: idle before the first kernel | {start_wait / 1e3:.2f} ms | after the arguments' copies |",
        f"| idle next to memsets | {by_memset / 1e3:.2f} ms | {len(memsets)} memsets, before: "
        + ", ".join(f"{family} {n}" for family, n in before.most_common())
        + " |",
        f"| idle elsewhere | {other / 1e3:.2f} ms | {len(gaps)} boundaries |",
    ]


def _kernel_family(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("fmha", "flash", "sdpa", "attention")):
        return "attention"
    if "conv" in low or "fprop_implicit" in low or "dgrad" in low or "wgrad" in low:
        return "convolution"
    if "layer_matmul" in low:
        return "matmul (layer_matmul, in place)"
    if any(k in low for k in ("gemm", "cutlass", "cublas", "xmma", "wgmma", "dot", "nvjet")):
        return "matmul"
    if any(k in low for k in ("memcpy", "memset", "copy", "dynamic_update_slice", "dynamic_slice", "dynamic-")):
        return "copies and slices"
    return "fused element-wise / other"
