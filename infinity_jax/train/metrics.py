"""Training metrics to the console, `workdir/metrics.jsonl` and TensorBoard event files (`workdir/tensorboard`).

Only process 0 writes. Array metrics (per-scale losses and accuracies) become one scalar per scale (`loss/s3`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

CONSOLE_KEYS = (
    ("loss", "loss {:.4f}"),
    ("acc", "acc {:.4f}"),
    ("l1", "L1 {:.4f}"),
    ("psnr", "PSNR {:.2f}"),
    ("grad_norm", "|g| {:.3g}"),
    ("learning_rate", "lr {:.3g}"),
    ("step_time", "{:.3f} s/step"),
    ("images_per_s", "{:.1f} img/s"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("mfu", "MFU {:.1%}"),
    ("peak_gib", "peak {:.1f} GiB"),
    ("data/skipped", "skipped {:.0f}"),
)


def flatten(metrics: dict) -> dict[str, float]:
    """{"loss_per_scale": [K]} -> {"loss/s0": …}; scalars -> float."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[name] = float(value)
        else:
            base = name.removesuffix("_per_scale")
            flat.update({f"{base}/s{k}": float(v) for k, v in enumerate(value.reshape(-1))})
    return flat


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
        self.enabled, self.total_steps = enabled, total_steps
        self.jsonl = self.tensorboard = self.progress = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, float], extra: dict | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars, **(extra or {})}) + "\n")
        self.jsonl.flush()
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        shown = [fmt.format(scalars[key]) for key, fmt in CONSOLE_KEYS if key in scalars]
        if not shown:  # e.g. an evaluation: its own keys
            shown = [f"{key} {value:.4g}" for key, value in scalars.items()]
        line = f"step {step}/{self.total_steps} | " + " | ".join(shown)
        if self.progress is not None:
            self.progress.n = step
            self.progress.refresh()
            self.progress.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            if self.progress is not None:
                self.progress.close()
