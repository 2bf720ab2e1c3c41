"""Held-out evaluation of a tokenizer: PSNR, SSIM, LPIPS and rFID per resolution, and a PNG grid of originals
(top row) above their reconstructions (bottom row).

The held-out records are `data.holdout_every`'s (never trained on), square-cropped to each `eval.resolutions`
entry's 1:1 pixel size (e.g. 0.06M → 256², 0.25M → 512²). Reconstructions are rounded to uint8, as a user would
save them, before any metric. rFID compares Inception-v3 pool features of the originals with those of the
reconstructions; on a few hundred images it is a biased estimate, comparable only between runs of one size.
"""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from infinity_jax import images as image_io
from infinity_jax import schedules
from infinity_jax.data import pipeline, sources
from infinity_jax.eval import image_metrics
from infinity_jax.tokenizer import Tokenizer
from infinity_jax.train import perceptual

_log = logging.getLogger("infinity_jax.eval")


def _to_unit(pixels):
    return pixels.astype(jnp.float32) / 127.5 - 1.0


def _quantize(recon):
    """[-1, 1] floats -> the uint8 values (as float32) a saved PNG would hold."""
    return jnp.round(jnp.clip((recon + 1.0) * 127.5, 0.0, 255.0))


def reconstruction_metrics(tokenizer: Tokenizer, lpips_params, inception_params, pixels, schedule, rules,
                           real_features: bool = False):  # fmt: skip
    """pixels: uint8 [B, H, W, 3] -> (metrics, reconstruction uint8 values [B, H, W, 3] as float32).

    metrics: psnr, ssim, lpips [B] and the Inception features [B, 2048] of the reconstructions (`features`) and,
    if `real_features`, of the originals (`real_features`); LPIPS and features only with their parameters.
    """
    with nn.logical_axis_rules(rules):
        recon = _quantize(tokenizer.reconstruct(_to_unit(pixels), schedule))
    original, rebuilt = pixels.astype(jnp.float32) / 255.0, recon / 255.0
    out = {"psnr": image_metrics.psnr(rebuilt, original), "ssim": image_metrics.ssim(rebuilt, original)}
    if lpips_params is not None:
        out["lpips"] = perceptual.lpips(lpips_params, _to_unit(pixels), rebuilt * 2.0 - 1.0)
    if inception_params is not None:
        from infinity_jax.eval import inception

        out["features"] = inception.features(inception_params, rebuilt * 2.0 - 1.0)
        if real_features:
            out["real_features"] = inception.features(inception_params, _to_unit(pixels))
    return out, recon


class ReconstructionEval:
    """Callable (tokenizer, step) -> {"eval/<res>/<metric>": value}; `enabled` is False without held-out data."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, rules, lpips_params, samples_dir: str):
        ev = config.eval
        _, held = sources.split_holdout(sources.make_source(config.data), config.data.holdout_every)
        self.enabled = held is not None and config.train.eval_every > 0 and bool(ev.resolutions)
        if not self.enabled:
            return
        count = len(held) if ev.num_images <= 0 else min(ev.num_images, len(held))
        self.records = [held[i] for i in range(count)]
        self.mesh, self.rules, self.samples_dir = mesh, rules, samples_dir
        self.batch_size, self.grid_images = ev.batch_size, ev.grid_images
        self.min_size, self.max_pixels = config.data.min_size, config.data.max_pixels
        self.resolutions = tuple(ev.resolutions)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.lpips = jax.device_put(lpips_params, replicated) if ev.lpips else None
        self.inception = None
        if ev.fid:
            from infinity_jax.eval import inception

            self.inception = jax.device_put(inception.load(ev.inception or None), replicated)
        self.real_features, self._loaded, self._compiled = {}, {}, {}
        self.batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if self.batch_size % ways or self.batch_size % jax.process_count():
            raise ValueError(
                f"eval.batch_size={self.batch_size} is not divisible by the mesh's {ways} batch shards "
                f"and {jax.process_count()} processes"
            )

    def _pixels(self, size: tuple[int, int]) -> tuple[np.ndarray, int]:
        """This process's share of the held-out images at `size` (uint8 [n, H, W, 3]) and how many were unusable."""
        share = self.records[jax.process_index() :: jax.process_count()]
        loaded, bad = [], 0
        for record in share:
            try:
                loaded.append(pipeline.read_image(record.get("image"), size, self.min_size, self.max_pixels))
            except pipeline.BadRecord as error:
                bad += 1
                _log.warning("held-out record %s skipped: %s", record["id"], error)
        if not loaded:
            raise ValueError("no usable held-out image for the evaluation")
        return np.stack(loaded), bad

    def _gather(self, x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _run(self, tokenizer, pixels: np.ndarray, schedule, real_features: bool):
        """Metrics of this process's `pixels`, gathered over processes without the padding rows, and the first
        batch's (originals, reconstructions)."""
        local = self.batch_size // jax.process_count()
        counts = [len(self.records[p :: jax.process_count()]) for p in range(jax.process_count())]
        steps = -(-max(counts) // local)  # the same number of batches on every process
        key = (schedule, real_features)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                functools.partial(
                    reconstruction_metrics, schedule=schedule, rules=self.rules, real_features=real_features
                )
            )
        fn = self._compiled[key]
        results, first = [], None
        for b in range(steps):
            chunk = pixels[b * local : (b + 1) * local]
            valid = np.arange(local) < len(chunk)
            padding = np.repeat(pixels[:1], local - len(chunk), axis=0)
            batch = jax.make_array_from_process_local_data(self.batch_sharding, np.concatenate([chunk, padding]))
            with jax.set_mesh(self.mesh):
                out, recon = fn(tokenizer, self.lpips, self.inception, batch)
            keep = self._gather(jax.make_array_from_process_local_data(self.batch_sharding, valid))
            results.append({k: self._gather(v)[keep] for k, v in out.items()})
            if first is None:
                first = (self._gather(batch)[keep], self._gather(recon)[keep])
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}, first

    def __call__(self, tokenizer: Tokenizer, step: int) -> dict[str, float]:
        results = {}
        for resolution in self.resolutions:
            schedule = schedules.infinity_schedule(1.0, resolution)
            if resolution not in self._loaded:
                self._loaded[resolution] = self._pixels(schedule.pixel_size)
            pixels, bad = self._loaded[resolution]
            cached = resolution in self.real_features or self.inception is None
            fake, (originals, recon) = self._run(tokenizer, pixels, schedule, real_features=not cached)
            if not cached:
                self.real_features[resolution] = fake.pop("real_features")
            name = f"eval/{schedule.pixel_size[0]}"
            results.update({f"{name}/{k}": float(np.mean(v)) for k, v in fake.items() if k != "features"})
            results[f"{name}/images"] = float(len(fake["psnr"]))
            results[f"{name}/skipped"] = float(bad)
            if self.inception is not None:
                from infinity_jax.eval import fid

                results[f"{name}/rfid"] = fid.fid(self.real_features[resolution], fake["features"])
            if jax.process_index() == 0 and self.grid_images > 0:
                n = min(self.grid_images, len(originals))
                grid = np.concatenate([np.concatenate(list(rows[:n]), axis=1) for rows in (originals, recon)], axis=0)
                path = os.path.join(self.samples_dir, f"recon_{schedule.pixel_size[0]}_{step:07d}.png")
                image_io.save_png(grid.astype(np.uint8), path)
        return results
