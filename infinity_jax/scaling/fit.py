"""Power laws of held-out loss against parameters and compute, fitted over the runs of a sweep (VAR §5, Fig. 5/6).

    python -m infinity_jax.scaling.fit runs/scaling/* --out runs/scaling/fit [--metric eval/last_scale_loss]

A law is L = (β·X)^α, fitted as a line in log-log space (least squares): the exponent α with its confidence
interval (Student's t on the slope's standard error), β, and Pearson's r of log X against log L. L(N) compares
the runs at one training budget, the largest that the most runs have reached (the full budget once they are
finished; a run stopped short of it is named and left out of L(N)): each run's last evaluation at or below it,
against its non-embedding parameters (the blocks; `--x params` for all). L(C) uses every evaluation of every run
and fits the compute-efficient frontier (the points no cheaper point beats), so runs still in progress count with
what they have evaluated so far. Runs of different bit depths d (vocabulary sweeps) are fitted and drawn
separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

RUN_INFO = "run.json"  # written by the sweep: what the run is (sizes, FLOPs per step, tokens per step)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L = (β·X)^alpha, fitted on `n` points; alpha ± alpha_ci at `confidence`; r: Pearson r of log-log. β is kept
    as log β: a nearly flat law has a β far outside floating point."""

    alpha: float
    log_beta: float
    alpha_ci: float
    r: float
    n: int
    confidence: float

    @property
    def beta(self) -> float:
        return math.exp(self.log_beta) if self.log_beta < 700 else math.inf

    def __call__(self, x):
        return np.exp(self.alpha * (self.log_beta + np.log(np.asarray(x, np.float64))))

    def describe(self) -> str:
        return (
            f"L = ({self.beta:.3g}·X)^{self.alpha:.4f}  (α = {self.alpha:.4f} ± {self.alpha_ci:.4f} at "
            f"{self.confidence:.0%}, Pearson r {self.r:.4f}, {self.n} points)"
        )


def fit_power_law(x, y, confidence: float = 0.95) -> PowerLaw:
    """Least-squares line through (log x, log y). Raises ValueError for fewer than 3 points, non-positive or
    non-finite values, or x without spread (a power law needs at least three distinct sizes)."""
    from scipy import stats

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"a power-law fit needs at least 3 points, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power-law fit needs finite, positive x and y (log-log space)")
    lx, ly = np.log(x), np.log(y)
    sxx = np.sum((lx - lx.mean()) ** 2)
    if len(np.unique(x)) < 3 or sxx == 0:
        raise ValueError(f"a power-law fit needs at least 3 distinct x values, got {sorted(set(x.tolist()))}")
    slope = np.sum((lx - lx.mean()) * (ly - ly.mean())) / sxx
    if slope == 0:
        raise ValueError("the loss does not change with x: no power law to fit")
    intercept = ly.mean() - slope * lx.mean()
    residuals = ly - (slope * lx + intercept)
    dof = x.size - 2
    stderr = math.sqrt(np.sum(residuals**2) / dof / sxx) if dof > 0 else math.inf
    half_width = float(stats.t.ppf(0.5 + confidence / 2, dof) * stderr)
    r = float(np.corrcoef(lx, ly)[0, 1])
    return PowerLaw(float(slope), float(intercept / slope), half_width, r, int(x.size), confidence)


def pareto_frontier(x, y) -> np.ndarray:
    """Indices of the points no point with x' <= x has a lower y than (the compute-efficient frontier), by x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    order = np.lexsort((y, x))
    keep, best = [], math.inf
    for i in order:
        if y[i] < best:
            keep.append(i)
            best = y[i]
    return np.asarray(keep, np.int64)


@dataclasses.dataclass
class Run:
    """One run of a sweep: what it is (`info`, from run.json) and its evaluations (step, tokens, flops, metrics)."""

    path: str
    info: dict
    evals: list[dict]

    @property
    def name(self) -> str:
        return self.info.get("name", os.path.basename(self.path.rstrip("/")))


def load_run(path: str) -> Run:
    """A run folder -> Run; ValueError if it is not a sweep run (no run.json)."""
    info_path = os.path.join(path, RUN_INFO)
    if not os.path.exists(info_path):
        raise ValueError(
            f"{path} is not a sweep run: it has no {RUN_INFO} (made by python -m infinity_jax.scaling.sweep)"
        )
    with open(info_path) as f:
        info = json.load(f)
    evals = []
    metrics_path = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                record = json.loads(line)
                if any(k.startswith("eval/") for k in record):
                    step = int(record["step"])
                    record["tokens"] = step * info["tokens_per_step"]
                    record["flops"] = step * info["flops_per_step"]
                    evals.append(record)
    # A resumed run may evaluate a step twice: keep the last evaluation of each step.
    by_step = {e["step"]: e for e in evals}
    return Run(path, info, [by_step[s] for s in sorted(by_step)])


def _common_budget(group: list[Run], metric: str) -> tuple[float, list[Run]]:
    """The token budget at which L(N) compares sizes, and the runs compared there: the largest budget that the most
    runs have reached. A run counts at budget T if it has evaluated at or below T and trained to at least T, so
    sizes are never compared at different budgets (a run stopped early would pass for a worse model)."""
    evaluated = {r.path: [e["tokens"] for e in r.evals if metric in e] for r in group}

    def members(t):
        return [r for r in group if min(evaluated[r.path]) <= t <= max(evaluated[r.path])]

    budget = max({t for ts in evaluated.values() for t in ts}, key=lambda t: (len(members(t)), t), default=0)
    return budget, members(budget)


def fit_runs(runs: list[Run], metric: str, x_key: str) -> dict:
    """{bits: {"N": PowerLaw or error, "C": PowerLaw or error, "points": ...}} for each bit depth among the runs."""
    results = {}
    for bits in sorted({r.info["bits"] for r in runs}):
        group = [r for r in runs if r.info["bits"] == bits and any(metric in e for e in r.evals)]
        tokens, members = _common_budget(group, metric)
        last = [(r.info[x_key], [e for e in r.evals if metric in e and e["tokens"] <= tokens][-1][metric], r.name)
                for r in members]  # fmt: skip
        every = [(e["flops"], e[metric]) for r in group for e in r.evals if metric in e]
        unfinished = [r.name for r in group if not r.info.get("done")]
        left_out = [r.name for r in group if r not in members]
        entry = {"last": last, "every": every, "tokens": tokens, "unfinished": unfinished, "left_out": left_out}
        try:
            entry["N"] = fit_power_law([p[0] for p in last], [p[1] for p in last])
        except ValueError as error:
            entry["N"] = error
        if every:
            c, loss = np.asarray(every).T
            front = pareto_frontier(c, loss)
            entry["frontier"] = [(float(c[i]), float(loss[i])) for i in front]
            try:
                entry["C"] = fit_power_law(c[front], loss[front])
            except ValueError as error:
                entry["C"] = error
        results[bits] = entry
    return results


def plot(runs: list[Run], results: dict, metric: str, x_key: str, out: str) -> list[str]:
    """L(N) and L(C) on log-log axes with the fitted laws; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for bits, entry in results.items():
        n, loss = np.asarray([p[0] for p in entry["last"]]), np.asarray([p[1] for p in entry["last"]])
        ax.scatter(n, loss, label=f"d={bits} runs", zorder=3)
        law = entry["N"]
        if isinstance(law, PowerLaw):
            grid = np.geomspace(n.min(), n.max(), 50)
            ax.plot(grid, law(grid), "--", label=f"d={bits}: α={law.alpha:.3f}, r={law.r:.3f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"{x_key.replace('_', ' ')} N",
        ylabel=metric,
        title="held-out loss vs N at equal tokens",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "loss_vs_params.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for run in runs:
        points = [(e["flops"], e[metric]) for e in run.evals if metric in e and e["flops"] > 0]
        if points:
            c, loss = np.asarray(points).T
            ax.plot(c, loss, alpha=0.4, lw=1, label=f"{run.name}")
    for bits, entry in results.items():
        law = entry.get("C")
        if isinstance(law, PowerLaw):
            c, loss = np.asarray(entry["frontier"]).T
            ax.scatter(c, loss, c="k", s=12, zorder=3)
            grid = np.geomspace(c.min(), c.max(), 50)
            ax.plot(grid, law(grid), "k--", lw=2, label=f"d={bits} frontier: α={law.alpha:.3f}, r={law.r:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=metric, title="held-out loss vs compute")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(out, "loss_vs_compute.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report(results: dict, metric: str, x_key: str) -> str:
    lines = [f"metric: {metric}"]
    for bits, entry in results.items():
        runs = len(entry["last"]) + len(entry["left_out"])
        unfinished = f", unfinished: {', '.join(entry['unfinished'])}" if entry["unfinished"] else ""
        line = f"bits d={bits}: {runs} runs{unfinished}; L(N) at {entry['tokens']:.4g} tokens each"
        if entry["left_out"]:
            line += f" (not at that budget, left out of L(N): {', '.join(entry['left_out'])})"
        lines.append(line)
        for x, loss, name in sorted(entry["last"]):
            lines.append(f"  {name}: {x_key} {x:,.0f}  {metric} {loss:.5f}")
        for label, key in ((f"L({x_key})", "N"), ("L(C) frontier", "C")):
            law = entry.get(key)
            text = law.describe() if isinstance(law, PowerLaw) else f"not fitted: {law}"
            lines.append(f"  {label}: {text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinity_jax.scaling.fit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", help="run folders of a sweep (each with run.json and metrics.jsonl)")
    parser.add_argument("--metric", default="eval/loss", help="e.g. eval/loss, eval/last_scale_loss, eval/free/loss")
    parser.add_argument("--x", default="non_embedding_params", choices=("non_embedding_params", "params"))
    parser.add_argument("--out", help="folder for the PNG plots and fit.json")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs if os.path.isdir(p)]
        if not runs:
            raise ValueError("no run folders given")
        results = fit_runs(runs, args.metric, args.x)
        if not any(entry["last"] for entry in results.values()):
            raise ValueError(f"no run has evaluated {args.metric!r} yet")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report(results, args.metric, args.x))
    if args.out:
        for path in plot(runs, results, args.metric, args.x, args.out):
            print(f"wrote {path}")
        summary = {
            str(bits): {k: dataclasses.asdict(v) for k, v in entry.items() if isinstance(v, PowerLaw)}
            for bits, entry in results.items()
        }
        with open(os.path.join(args.out, "fit.json"), "w") as f:
            json.dump({"metric": args.metric, "x": args.x, "fits": summary}, f, indent=1)
    return 0


def console_main():
    sys.exit(main())


if __name__ == "__main__":
    console_main()
