"""Ahead-of-time compilation of the real train step for a TPU slice or NVIDIA GPU hosts, from shapes alone, on any
machine.

    python -m infinity_jax.aot --config configs/infinity.py:size=2b,res=0.25M,batch=256 --topology v5p:4x4x4 \
        --mesh data=1,fsdp=64,tensor=1
    python -m infinity_jax.aot --config configs/infinity.py:size=2b,res=0.25M,batch=32 --topology h100:8

With libtpu (`pip install "jax[tpu]"`) or the CUDA plugin (`pip install "jax[cuda13-local]"`, no GPU or driver
needed), `jax.experimental.topologies` describes the chips on a CPU host and XLA compiles the step for them: no
parameters are materialised. The report gives the per-chip memory (arguments, outputs, temporaries, total
against the chip's HBM), the compiler's FLOPs per step against our analytic count, the predicted step time at a
stated MFU, the kernels one call launches (`kernels.inventory`) and the sharding of the largest arrays. A step
that does not fit (the compiler refuses it, or the total exceeds the chip's memory) exits non-zero with what to
change. With `--config.data.precomputed=True` the step is the one that trains on `data.precompute`'s records:
latents and T5 features in the batch, no frozen towers. The compiler's FLOPs count a scanned loop's body once, so
for `scan_blocks` layouts it is far below the analytic count; the analytic count is the one used for time and MFU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags

from infinity_jax import cli, flops, kernels, schedules, sharding
from infinity_jax import config as config_lib
from infinity_jax.train import frozen as frozen_towers
from infinity_jax.train import trainer
from infinity_jax.train.step import Frozen

GIB = 1 << 30
# HBM per chip (datasheets), by jax device_kind; "lite" kinds first: "TPU v5" is a prefix of "TPU v5 lite".
HBM_BYTES = {"TPU v5 lite": 16 * GIB, "TPU v6 lite": 32 * GIB, "TPU v5": 95 * GIB, "TPU v4": 32 * GIB,
             "NVIDIA H100": 80 * 10**9, "NVIDIA H200": 141 * 10**9}  # fmt: skip
# JAX's GPU allocator takes this share of the memory by default; a program must fit in it, not in the whole.
GPU_MEMORY_FRACTION = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))

# What XLA needs to compile for a GPU it cannot see (GpuTargetConfig, from the SXM datasheets: 132 SMs with 228 KiB
# of shared memory each, 50 MiB of L2). Memory size and bandwidth are the two fields that differ.
GPUS = {"h100": ("NVIDIA H100 80GB HBM3", 80 * 10**9, 3.35e12), "h200": ("NVIDIA H200", 141 * 10**9, 4.8e12)}
GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth:.0f} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }} runtime_version {{ major: 13 }}
device_description_str: "{kind}"
"""


def hbm_bytes(device) -> int | None:
    """The memory a program may use on one chip: the HBM on TPU, JAX's allocator's share of it on GPU."""
    total = next((v for k, v in HBM_BYTES.items() if device.device_kind.startswith(k)), None)
    if total and device.platform in ("gpu", "cuda"):
        return int(total * GPU_MEMORY_FRACTION)
    return total


def topology_devices(name: str) -> list:
    """The devices of a TPU slice ("v5p:4x4x4", "v5e:16x16", "v6e:2x2"; needs libtpu) or of GPU hosts ("h100:8" for
    one host of 8, "h200:2x8" for two; needs the CUDA plugin, `jax[cuda13-local]`, but no GPU)."""
    from jax.experimental import topologies

    chip, _, shape = name.partition(":")
    try:
        if chip in GPUS:
            kind, memory, bandwidth = GPUS[chip]
            hosts, _, per_host = shape.rpartition("x")
            config = GPU_TARGET.format(kind=kind, memory=memory, bandwidth=bandwidth)
            topology = f"1x{int(hosts or 1)}x{int(per_host)}"  # slices x hosts x GPUs per host
            return list(topologies.get_topology_desc(platform="cuda", target_config=config, topology=topology).devices)
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as error:  # the plugins raise plain RuntimeErrors for unknown names and when missing
        need = "the CUDA plugin: pip install 'jax[cuda13-local]'" if chip in GPUS else "libtpu: pip install 'jax[tpu]'"
        raise ValueError(
            f"cannot describe topology {name!r} ({error}); TPU slices are written v5p:4x4x4, GPU hosts h100:8 or "
            f"h200:2x8; this needs {need}"
        ) from None


def compile_only(names) -> None:
    """Before JAX starts its backends: for GPU topologies (or chip kinds, "h100") it runs compile-only, so that the
    CUDA plugin describes the GPUs without initialising (or needing) a local GPU."""
    if any(name.partition(":")[0] in GPUS for name in names):
        jax.config.update("jax_platforms", "cpu")


def parse_mesh(spec: str) -> dict[str, int]:
    """ "data=2,fsdp=4,tensor=1" -> {"data": 2, "fsdp": 4, "tensor": 1}; omitted axes keep the config's."""
    sizes = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in sharding.MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r}; axes: {', '.join(sharding.MESH_AXES)}")
        sizes[name] = int(value)
    return sizes


def slice_mesh(config: ml_collections.ConfigDict, devices, mesh_sizes: dict[str, int]) -> jax.sharding.Mesh:
    """The config's mesh with `mesh_sizes` overriding some axes, over the slice's devices."""
    return sharding.make_mesh(**{**{k: config.mesh[k] for k in sharding.MESH_AXES}, **mesh_sizes}, devices=devices)


def abstract_batch(config: ml_collections.ConfigDict, schedule: schedules.Schedule) -> dict:
    """The host batch's shapes for one schedule (what the input pipeline delivers): images and caption tokens, or
    with `data.precomputed` the tokenizer's latents and T5 features (`data.precompute`'s records)."""
    b, precomputed = config.train.batch_size, config.data.precomputed
    if precomputed:
        layout = config_lib.tokenizer_layout(config.tokenizer)
        grid = (schedule.upsampled(2) if layout.patchify else schedule).grid
        batch = {"latent": jax.ShapeDtypeStruct((b, *grid, layout.bits), np.float32)}
    else:
        batch = {"image": jax.ShapeDtypeStruct((b, *schedule.pixel_size, 3), np.uint8)}
    if config.model.cond != "text":
        return {**batch, "label": jax.ShapeDtypeStruct((b,), np.int32)}
    t = config.text.max_length
    if precomputed:
        batch["text"] = jax.ShapeDtypeStruct((b, t, config.model.text_dim), np.float32)
    else:
        batch["tokens"] = jax.ShapeDtypeStruct((b, t), np.int32)
    return {**batch, "text_mask": jax.ShapeDtypeStruct((b, t), bool)}


@dataclasses.dataclass
class Report:
    topology: str
    device_kind: str
    chips: int
    mesh: dict[str, int]
    schedule: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm: int | None
    peak_flops: float | None  # per chip, bf16
    compiler_flops: float | None
    analytic_flops: float
    largest: list[tuple[str, tuple[int, ...], str]]
    kernels: kernels.Inventory

    @property
    def total_bytes(self) -> int:
        # Donated state is both an argument and an output: count it once.
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.hbm is None or self.total_bytes <= self.hbm

    def step_seconds(self, mfu: float) -> float | None:
        return self.analytic_flops / (self.peak_flops * self.chips * mfu) if self.peak_flops else None

    def lines(self, mfu: float) -> list[str]:
        hbm = f"{self.hbm / GIB:.1f}" if self.hbm else "?"
        lines = [
            f"topology {self.topology} ({self.chips} × {self.device_kind}), mesh {self.mesh}, schedule {self.schedule}",
            f"per-chip memory: arguments {self.argument_bytes / GIB:.2f} GiB, outputs {self.output_bytes / GIB:.2f} "
            f"GiB (donated {self.alias_bytes / GIB:.2f}), temporaries {self.temp_bytes / GIB:.2f} GiB, "
            f"total {self.total_bytes / GIB:.2f} of {hbm} GiB: {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        compiler = f"{self.compiler_flops:.3e}" if self.compiler_flops else "n/a"
        lines.append(f"FLOPs per call: analytic {self.analytic_flops:.3e} (all chips), compiler {compiler} (per chip)")
        seconds = self.step_seconds(mfu)
        if seconds:
            lines.append(f"predicted time per call at {mfu:.0%} MFU: {seconds:.3f} s")
        lines.append(self.kernels.line())
        lines.append("heaviest kernels (bytes written per call, launches, family, instruction, shape, source):")
        lines += [f"  {kernel.line()}" for kernel in self.kernels.heaviest]
        lines.append("largest arrays (per-chip shard shape):")
        lines += [f"  {name} {shape} {spec}" for name, shape, spec in self.largest]
        return lines


def _largest(abstract_state, count: int = 6) -> list[tuple[str, tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    leaves.sort(key=lambda item: -math.prod(item[1].shape))
    out = []
    for path, leaf in leaves[:count]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out.append((name, tuple(leaf.sharding.shard_shape(leaf.shape)), str(leaf.sharding.spec)))
    return out


def compile_train_step(config: ml_collections.ConfigDict, devices, mesh_sizes: dict[str, int], template: float):
    """Lowers and compiles the train step for `devices`. Returns (compiled, Report)."""
    mesh = slice_mesh(config, devices, mesh_sizes)
    setup = trainer.build(config, mesh)
    schedule = schedules.infinity_schedule(template, config.schedule.resolution)
    # As the trainer: precomputed latents and T5 features leave the frozen towers off the device.
    frozen = Frozen() if config.data.precomputed else frozen_towers.abstract(config, mesh, setup.step_config)
    batch = abstract_batch(config, schedule)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding) for k, v in batch.items()}
    jitted, fn = trainer.jit_step(setup, schedule, jax.tree.map(lambda x: x.sharding, frozen), batch)
    with jax.set_mesh(mesh):
        compiled = _compile(jitted, (setup.abstract_state, frozen, batch), mesh)
        analytic = flops.count_flops(fn, setup.abstract_state, frozen, batch)
    return compiled, _report(compiled, devices, mesh, schedule.name, analytic, setup)


def compile_tokenizer_step(config: ml_collections.ConfigDict, devices, mesh_sizes: dict[str, int], template: float):
    """Lowers and compiles the tokenizer's train step (configs/tokenizer.py: generator, discriminator, LPIPS) for
    `devices`. Returns (compiled, Report)."""
    from infinity_jax.train import perceptual, vae

    mesh = slice_mesh(config, devices, mesh_sizes)
    setup = vae.build(config, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    # LPIPS is frozen and replicated; its shapes are read from the package's weights, never placed on the slice.
    lpips = perceptual.load_params() if setup.sc.perceptual_weight > 0 else None
    frozen = vae.VAEFrozen(lpips=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                              lpips))  # fmt: skip
    schedule = schedules.infinity_schedule(template, config.schedule.resolution)
    b = config.train.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, *schedule.pixel_size, 3), np.uint8, sharding=setup.batch_sharding)}
    jitted, fn = setup.jit_step(schedule, batch, frozen)
    with jax.set_mesh(mesh):
        compiled = _compile(jitted, (setup.abstract_state, frozen, batch), mesh)
        analytic = flops.count_flops(fn, setup.abstract_state, frozen, batch)
    return compiled, _report(compiled, devices, mesh, f"tokenizer {schedule.name}", analytic, setup)


def compile_generation(config: ml_collections.ConfigDict, devices, mesh_sizes: dict[str, int], template: float,
                       batch: int = 1, text_tokens: int = 32, generation_kernels: str | None = None):  # fmt: skip
    """Lowers and compiles one guided generation (all scales, then the tokenizer's decode) for `devices`, with the
    transformer's parameters sharded by the config's rules; `generation_kernels` as `TransformerConfig`'s (on GPUs,
    "pallas" compiles the one-pass Triton kernels too), None: what `for_inference` picks for the devices.
    Returns (compiled, Report)."""
    from infinity_jax.generate import Static, _generate, _one_device, for_inference
    from infinity_jax.models.transformer import Infinity

    mesh = slice_mesh(config, devices, mesh_sizes)
    setup = trainer.build(config, mesh)
    # What generation runs: bf16 blocks, and on one Hopper GPU scanned blocks' gemms reading the stacked weights in
    # place, unrolled blocks' one-pass kernels around the self-attention.
    params, model_config = for_inference(setup.abstract_state.params, setup.step_config.model)
    if generation_kernels is not None:
        model_config = dataclasses.replace(model_config, generation_kernels=generation_kernels)
    schedule = schedules.infinity_schedule(template, config.schedule.resolution)
    frozen = frozen_towers.abstract(config, mesh, setup.step_config)
    static = Static(model_config, schedule, batch, guided=True, known=False, return_logits=False,
                    patchify=config.tokenizer.patchify, uninitialized_cache=_one_device(params) is not None)  # fmt: skip
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    k = schedule.num_scales
    if model_config.cond == "text":
        cond = (spec((batch, text_tokens, model_config.text_dim), np.float32), spec((batch, text_tokens), bool), None)
    else:
        cond = (None, None, spec((batch,), np.int32))
    args = (params, spec((), jax.random.key(0).dtype), *cond, None, None,
            spec((k,), np.float32), spec((k,), np.float32), spec((), np.int32), spec((), np.float32), None,
            frozen.tokenizer, None)  # fmt: skip
    Infinity(model_config).check_schedule(schedule)
    fn = functools.partial(_generate, static=static)
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.step_config.rules):
        compiled = _compile(jax.jit(fn), args, mesh)
        analytic = flops.count_flops(fn, *args)
    what = (f"generate {schedule.name} batch {batch}, layer weights {model_config.layer_weights}, kernels "
            f"{model_config.generation_kernels}")  # fmt: skip
    return compiled, _report(compiled, devices, mesh, what, analytic, setup)


def _compile(jitted, args, mesh):
    # Without a GPU XLA cannot autotune its Triton gemms, and its untuned split-K guesses can fail to tile small
    # dots: compile them as cuBLAS calls (what the autotuner picks for most of our shapes anyway).
    gpu = mesh.devices.flat[0].platform in ("gpu", "cuda")
    options = {"xla_gpu_enable_triton_gemm": False} if gpu else None
    try:
        return jitted.lower(*args).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = next((line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line), str(error))
        raise DoesNotFit(f"{message.strip()} (mesh {dict(mesh.shape)})") from None


def _report(compiled, devices, mesh, what: str, analytic: float, setup) -> Report:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Report(
        topology="",
        device_kind=devices[0].device_kind,
        chips=len(devices),
        mesh=dict(mesh.shape),
        schedule=what,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        hbm=hbm_bytes(devices[0]),
        peak_flops=flops.peak_flops(devices[0]),
        compiler_flops=(cost or {}).get("flops"),
        analytic_flops=analytic,
        largest=_largest(setup.abstract_state),
        kernels=kernels.inventory(compiled.as_text()),
    )


class DoesNotFit(Exception):
    """The compiler ran out of memory (the TPU compiler refuses to compile a program that cannot fit)."""


def advice(mesh: dict[str, int], chips: int, config: ml_collections.ConfigDict) -> str:
    """What to change when the step does not fit."""
    hints = []
    if mesh["fsdp"] < chips // max(mesh["tensor"], 1):
        hints.append("shard the weights over more chips (--mesh fsdp=<chips>, data=1)")
    if "model" in config and config.model.remat != "nothing_saveable":
        hints.append("rematerialise more (--config.model.remat=nothing_saveable)")
    if config.train.grad_accum < config.train.batch_size:
        hints.append("split the batch (--config.train.grad_accum=2 or more) or lower --config.train.batch_size")
    hints.append("add tensor parallelism for wide layouts (--mesh tensor=4) or take a larger slice")
    return "; ".join(hints)


def _compile_fn(config: ml_collections.ConfigDict, generate: bool):
    """The compile function for what the config trains; ValueError for a config without a train step."""
    if config.get("task") == "tokenizer":
        if generate:
            raise ValueError("--generate needs a transformer config (configs/infinity.py or configs/scaling.py)")
        return compile_tokenizer_step
    if "train" not in config or "mesh" not in config:
        raise ValueError(
            "this config has no train step to compile (configs/var.py: VAR runs through the converter and the "
            "sampler only); use configs/infinity.py, configs/scaling.py or configs/tokenizer.py"
        )
    return compile_generation if generate else compile_train_step


def main(config):
    f = flags.FLAGS
    if not f.topology:
        raise SystemExit("error: --topology is required, e.g. --topology v5p:4x4x4")
    compile_only([f.topology])
    try:
        devices = topology_devices(f.topology)
        mesh = parse_mesh(f.mesh)
        compile_fn = _compile_fn(config, f.generate)
        kernels = None if f.generation_kernels == "auto" else f.generation_kernels
        extra = {"batch": f.generate_batch, "generation_kernels": kernels} if f.generate else {}
        compiled, report = compile_fn(config, devices, mesh, f.template, **extra)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    except DoesNotFit as error:
        print(f"DOES NOT FIT: {error}")
        sizes = slice_mesh(config, devices, mesh).shape
        raise SystemExit(
            f"the train step does not fit {f.topology}: {advice(dict(sizes), len(devices), config)}"
        ) from None
    report.topology = f.topology
    print("\n".join(report.lines(f.mfu)))
    if f.dump_hlo:
        with open(f.dump_hlo, "w") as file:
            file.write(compiled.as_text())
        print(f"optimized HLO written to {f.dump_hlo}")
    if not report.fits:
        raise SystemExit(f"the train step does not fit {f.topology}: {advice(report.mesh, report.chips, config)}")


if __name__ == "__main__":
    flags.DEFINE_string("topology", None, "TPU slice (v5p:4x4x4, v5e:16x16, v6e:8x8) or GPU hosts (h100:8, h200:2x8).")
    flags.DEFINE_string("mesh", "", "Mesh axis sizes, e.g. data=1,fsdp=64,tensor=1 (default: the config's).")
    flags.DEFINE_float("template", 1.0, "Aspect-ratio template (h/w) of the compiled batch shape.")
    flags.DEFINE_float("mfu", 0.45, "MFU assumed for the predicted step time.")
    flags.DEFINE_bool("generate", False, "Compile one guided generation (32 text tokens) instead.")
    flags.DEFINE_integer("generate_batch", 1, "Images per guided generation (each with its unguided twin).")
    flags.DEFINE_enum(
        "generation_kernels",
        "auto",
        ["auto", "xla", "pallas"],
        "With --generate: what generate.for_inference picks for the topology (on one Hopper GPU: the Pallas kernels "
        "for unrolled blocks), XLA's passes, or the one-pass Pallas kernels around the self-attention.",
    )
    flags.DEFINE_string("dump_hlo", "", "Write the optimized HLO of the compiled program to this file.")
    cli.run(main)
