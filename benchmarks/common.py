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
