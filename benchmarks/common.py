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

    Returns markdown rows: total device ms, then the `top` kernels (ms, share, calls), and the share of each
    family (matmul, attention, fused element-wise, copies), so that a table explains where a step's time goes.
    Every kernel's total is also written to `logdir/kernels.tsv`.
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
    by_name, calls = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e:
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
    rows = [f"| device total | {total:.2f} ms | |", "|---|---|---|"]
    rows += [f"| {family} | {ms:.2f} ms | {ms / total:.0%} |" for family, ms in families.most_common()]
    rows += [
        f"| `{name[:70]}` | {ms:.2f} ms | {ms / total:.0%} ({calls[name]} calls) |"
        for name, ms in by_name.most_common(top)
    ]
    return rows


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
