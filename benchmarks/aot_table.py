"""The fit table: for each size and resolution, the smallest TPU slice or GPU host of each chip kind whose train
step fits.

Run from the repository root on any CPU host with libtpu and the CUDA plugin (the test extra, or `pip install -e
".[tpu]"` / `"jax[cuda13-local]"`): every entry is a real ahead-of-time compile of the train step
(`infinity_jax.aot`), from shapes only. Slices are tried smallest first; on each, pure FSDP over all chips, then
FSDP with 4-way tensor parallelism. The global batch is `--per_chip` images per chip.

    python benchmarks/aot_table.py --sizes 125m,1b,2b,8b,20b --res 0.06M,1M --chips v5p,v5e,v6e --out docs/tpu.md
    python benchmarks/aot_table.py --sizes 2b,8b --res 0.06M --chips h100,h200 --per_chip 16 --out docs/gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import sys

from infinity_jax import aot
from infinity_jax.cli import load_config_file
from infinity_jax.models import sizes

SLICES = {
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8", "v5p:4x8x8"],
    "v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"],
    "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"],
    # GPU hosts of 8 (NVLink within a host): one GPU, part of a host, whole hosts.
    "h100": ["h100:1", "h100:2", "h100:4", "h100:8", "h100:2x8", "h100:4x8"],
    "h200": ["h200:1", "h200:2", "h200:4", "h200:8", "h200:2x8", "h200:4x8"],
}


# fp32 parameters, gradients and two Adam moments: a floor under the per-chip memory of any mesh.
STATE_BYTES_PER_PARAM = 16


def smallest_fit(size: str, res: str, chip: str, per_chip: float, mfu: float, attention: str = "xla"):
    state_bytes = STATE_BYTES_PER_PARAM * sizes.count_params(sizes.get_size(size))
    for topology in SLICES[chip]:
        devices = aot.topology_devices(topology)
        chips = len(devices)
        if state_bytes / chips > aot.hbm_bytes(devices[0]):
            continue  # cannot fit whatever the mesh: skip a compile of minutes
        batch = max(int(per_chip * chips), 1)
        config = load_config_file(f"configs/infinity.py:size={size},res={res},batch={batch}")
        config.model.attention = attention
        meshes = [{"data": 1, "fsdp": chips, "tensor": 1}]
        if chips >= 8:
            meshes.append({"data": 1, "fsdp": chips // 4, "tensor": 4})
        for mesh in meshes:
            try:
                _, report = aot.compile_train_step(config, devices, mesh, 1.0)
            except aot.DoesNotFit:
                continue
            if report.fits:
                report.topology = topology
                return report, batch, config.model.remat, report.step_seconds(mfu)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="125m,1b,2b,8b,20b")
    parser.add_argument("--res", default="0.06M,1M")
    parser.add_argument("--chips", default="v5p,v5e,v6e")
    parser.add_argument("--per_chip", type=float, default=1.0, help="images per chip in the global batch")
    parser.add_argument("--mfu", type=float, default=0.45)
    parser.add_argument("--out", default=None, help="append the table (markdown) to this file")
    parser.add_argument(
        "--attention",
        default="xla",
        choices=("xla", "splash", "cudnn"),
        help="splash: the TPU kernel (1024²'s mask); cudnn: NVIDIA's (needs nvidia-cudnn-cu13 on a CPU host)",
    )
    args = parser.parse_args()
    aot.compile_only(args.chips.split(","))
    lines = [
        f"### Smallest slices or GPU hosts whose train step fits ({datetime.date.today().isoformat()})",
        "",
        f"Command: `python {' '.join(sys.argv)}`; {args.per_chip:g} image(s) per chip, predicted time at "
        f"{args.mfu:.0%} MFU from the analytic FLOPs.",
        "",
        "| size | res | chip | slice | mesh (data, fsdp, tensor) | batch | remat | GiB per chip (of HBM) | step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    # Each row is written as soon as it is known: a long sweep that is stopped keeps what it found.
    out = open(args.out, "a") if args.out else None
    emit(lines, out, new=True)
    for size in args.sizes.split(","):
        for res in args.res.split(","):
            for chip in args.chips.split(","):
                found = smallest_fit(size, res, chip, args.per_chip, args.mfu, args.attention)
                if found is None:
                    emit([f"| {size} | {res} | {chip} | none up to {SLICES[chip][-1]} | | | | | |"], out)
                    continue
                report, batch, remat, seconds = found
                mesh = ", ".join(str(v) for v in report.mesh.values())
                memory = f"{report.total_bytes / aot.GIB:.1f} ({report.hbm / aot.GIB:.0f})"
                emit([f"| {size} | {res} | {chip} | {report.topology} | {mesh} | {batch} | {remat} | {memory} | "
                      f"{seconds:.3f} |"], out)  # fmt: skip
    if out:
        out.close()


def emit(lines: list[str], out, new: bool = False) -> None:
    print("\n".join(lines), flush=True)
    if out:
        out.write(("\n" if new else "") + "\n".join(lines) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
