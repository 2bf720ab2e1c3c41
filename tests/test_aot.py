"""Ahead-of-time compilation for TPU slices and GPU hosts on CPU (libtpu and the CUDA plugin: test extra)."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from infinity_jax import aot, kernels, schedules
from infinity_jax.cli import load_config_file
from infinity_jax.train import perceptual

TINY = "configs/infinity.py:size=tiny,res=0.004M,tokenizer=tiny,t5=tiny,batch=8"


def _devices(name):
    """A TPU slice (needs libtpu) or GPU hosts (h100:/h200:, compiled by XLA's GPU compiler from a target
    description: needs the CUDA plugin, jax[cuda13-local], but no GPU); both come with the test extra."""
    gpu = name.startswith(tuple(aot.GPUS))
    if importlib.util.find_spec("jax_plugins.xla_cuda13" if gpu else "libtpu") is None:
        pytest.skip(f"{'the CUDA plugin' if gpu else 'libtpu'} is not installed (pip install -e '.[test]' installs it)")
    return aot.topology_devices(name)


def test_tiny_train_step_compiles_for_v5e_and_reports_memory():
    devices = _devices("v5e:2x2")
    assert len(devices) == 4 and aot.hbm_bytes(devices[0]) == 16 << 30
    compiled, report = aot.compile_train_step(load_config_file(TINY), devices, aot.parse_mesh("data=2,fsdp=2"), 1.0)
    assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 1} and report.chips == 4
    assert "convolution(" in compiled.as_text()  # the frozen tokenizer encodes the batch's images in the step
    assert 0 < report.argument_bytes < 1 << 28 and report.temp_bytes > 0 and report.fits
    # The compiler's per-chip count (which also sees element-wise work) against our analytic count of matmuls
    # and convolutions over all chips: the same order.
    assert 0.8 < report.compiler_flops * report.chips / report.analytic_flops < 2.0
    names = [name for name, _, _ in report.largest]
    assert "cfg_uncond" in names and any("fsdp" in spec for _, _, spec in report.largest)
    assert any(line.endswith("fits") for line in report.lines(0.45))


@pytest.mark.parametrize("cond", ["text", "class"])
def test_abstract_batch_holds_images_and_tokens_or_precomputed_latents_and_features(cond):
    config = load_config_file(TINY.replace("batch=8", f"batch=8,cond={cond}"))
    schedule = schedules.infinity_schedule(1.0, config.schedule.resolution)  # 64² pixels, a 4×4 latent (stride 16)

    def shapes():
        return {k: (v.shape, np.dtype(v.dtype).name) for k, v in aot.abstract_batch(config, schedule).items()}

    condition = {"label": ((8,), "int32")}
    if cond == "text":
        condition = {"tokens": ((8, 32), "int32"), "text_mask": ((8, 32), "bool")}
    assert shapes() == {"image": ((8, 64, 64, 3), "uint8"), **condition}
    config.data.precomputed = True
    if cond == "text":
        condition = {"text": ((8, 32, config.model.text_dim), "float32"), "text_mask": ((8, 32), "bool")}
    assert shapes() == {"latent": ((8, 4, 4, 16), "float32"), **condition}


def test_guided_generation_compiles_with_sharded_parameters():
    devices = _devices("v5e:2x2")
    _, report = aot.compile_generation(load_config_file(TINY), devices, aot.parse_mesh("data=2,fsdp=2"), 1.0)
    assert (
        report.fits
        and report.schedule == "generate 1.0@0.004M batch 1, layer weights slice, kernels xla"
        and report.temp_bytes > 0
    )
    assert 0.5 < report.compiler_flops * report.chips / report.analytic_flops < 8.0
    assert any(spec.startswith("P('fsdp'") for _, _, spec in report.largest)


def test_a_step_that_does_not_fit_fails_with_advice():
    _devices("v5e:2x2")
    command = [sys.executable, "-m", "infinity_jax.aot", f"--config={TINY.replace('batch=8', 'batch=8192').replace('0.004M', '0.06M')}",
               "--topology=v5e:2x2", "--mesh=data=4"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)  # conftest allows a second libtpu user
    assert result.returncode != 0
    assert "DOES NOT FIT" in result.stdout
    assert "the train step does not fit v5e:2x2" in result.stderr and "grad_accum" in result.stderr


def test_bad_topology_and_mesh_names_are_clear_errors():
    _devices("v5e:2x2")
    with pytest.raises(ValueError, match="cannot describe topology 'v9z:3x3'"):
        aot.topology_devices("v9z:3x3")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        aot.parse_mesh("data=2,model=2")


def test_tokenizer_train_step_compiles_with_its_discriminator_and_lpips():
    # Four GPUs rather than a TPU slice: XLA's TPU compiler took ~3× as long over LPIPS's VGG16 and its gradient
    # (160 s). The GPU compiler reports no FLOPs, so the analytic count is not compared here (test_flops.py counts
    # the tokenizer by hand).
    devices = _devices("h100:4")
    config = load_config_file("configs/tokenizer.py:tokenizer=tiny,res=0.004M,batch=8")
    _, report = aot.compile_tokenizer_step(config, devices, aot.parse_mesh("data=1,fsdp=4"), 1.0)
    assert report.fits and report.schedule == "tokenizer 1.0@0.004M" and report.temp_bytes > 0
    # The frozen LPIPS-VGG16 (replicated, 59 MB in float32) is among each chip's arguments, beside the two networks
    # and their Adam states (38 MB per chip without LPIPS).
    lpips_bytes = sum(x.nbytes for x in jax.tree.leaves(perceptual.load_params()))
    assert report.argument_bytes > lpips_bytes + 30e6
    assert report.compiler_flops is None and report.analytic_flops > 0
    names = [name for name, _, _ in report.largest]
    assert all(name.startswith(("generator/", "discriminator/")) for name in names)


def test_configs_without_a_train_step_are_clear_errors():
    with pytest.raises(ValueError, match="no train step to compile"):
        aot._compile_fn(load_config_file("configs/var.py:size=d16"), generate=False)
    with pytest.raises(ValueError, match="--generate needs a transformer config"):
        aot._compile_fn(load_config_file("configs/tokenizer.py:tokenizer=tiny"), generate=True)
    assert aot._compile_fn(load_config_file(TINY), generate=True) is aot.compile_generation


def test_guided_generation_compiles_for_an_h200_with_in_place_layer_gemms():
    devices = _devices("h200:1")
    assert devices[0].device_kind == "NVIDIA H200" and aot.hbm_bytes(devices[0]) == int(141e9 * 0.75)
    # Scanned bf16 blocks, as for_inference leaves them: on one Hopper GPU their gemms read the stacks in place.
    config = load_config_file(TINY + ",res=0.016M")
    config.model.update(scan_blocks=True, dtype="bfloat16")
    _, report = aot.compile_generation(config, devices, {}, 1.0, generation_kernels="pallas")
    assert report.schedule.endswith("layer weights in_place, kernels pallas") and report.fits
    schedule = aot.schedules.infinity_schedule(1.0, config.schedule.resolution)
    # One Triton layer_matmul per dense layer of each block at each scale: q·k·v, proj, cross q, proj, fc1, fc2 (the
    # cross-attention's keys and values of the caption are projected once per generation), and the one-pass
    # residual + LayerNorm (ops.residual_norm; ops.qkv_cache needs unrolled blocks), all compiled for Hopper.
    kernels = report.kernels
    assert kernels.launches["pallas"] == (6 + 1) * 2 * schedule.num_scales, kernels.launches
    assert kernels.unknown_trips == 0 and kernels.collective_bytes == 0
    assert kernels.launches["conv"] > 0 and kernels.written["fusion"] > 0  # the tokenizer's decode
    assert "kernels launched per call" in "\n".join(report.lines(0.45))


def test_inference_layout_on_one_hopper_gpu_is_what_was_measured_for_each_block_layout():
    from infinity_jax.generate import for_inference
    from infinity_jax.models.transformer import TransformerConfig

    def picks(topology, scan_blocks):
        devices = _devices(topology)
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("data",)), jax.P())
        params = {"blocks": {"kernel": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}}
        config = TransformerConfig.from_size("infinity_2b", dtype="bfloat16", scan_blocks=scan_blocks)
        cast, config = for_inference(params, config)
        assert cast["blocks"]["kernel"].dtype == jax.numpy.bfloat16
        return config.layer_weights, config.generation_kernels

    # Scanned blocks read the stacked weights in place; unrolled ones run the one-pass kernels (RESULTS.md).
    assert picks("h100:1", scan_blocks=True) == ("in_place", "xla")
    assert picks("h100:1", scan_blocks=False) == ("slice", "pallas")
    assert picks("h100:2", scan_blocks=False) == ("slice", "xla")  # two GPUs: XLA partitions the program


def test_fsdp_over_four_gpus_shards_the_state_and_gathers_the_weights_and_updates_them_in_place():
    devices = _devices("h100:4")
    config = load_config_file(TINY)
    config.data.precomputed = True  # latents and T5 features in the batch, as `data.precompute` writes them
    compiled, data = aot.compile_train_step(config, devices, aot.parse_mesh("data=4,fsdp=1"), 1.0)
    _, fsdp = aot.compile_train_step(config, devices, aot.parse_mesh("data=1,fsdp=4"), 1.0)
    # Data parallelism keeps each weight whole on every GPU, FSDP a quarter of it.
    fc1 = "blocks/block_0/ffn/fc1/kernel"
    (data_shard,), ((fsdp_shard, spec),) = ([s for n, s, _ in data.largest if n == fc1],
                                            [(s, p) for n, s, p in fsdp.largest if n == fc1])  # fmt: skip
    assert "fsdp" in spec and np.prod(data_shard) == 4 * np.prod(fsdp_shard), (data_shard, fsdp_shard)
    # Data parallelism all-reduces the gradients; FSDP gathers every weight before use and reduce-scatters the
    # gradients to their owners.
    assert data.kernels.launches.get("all-reduce", 0) > 0 and "all-gather" not in data.kernels.launches
    assert fsdp.kernels.launches.get("all-gather", 0) > 0 and fsdp.kernels.launches.get("reduce-scatter", 0) > 0
    assert fsdp.kernels.collective_bytes > 0 and data.kernels.collective_bytes > 0
    # The data-parallel step's optimizer update writes the parameters and AdamW moments over its donated inputs.
    # Fused with the metrics' norms, the update kernels could not: each was written to a temporary and copied into
    # place (87 copies for one GPU).
    hlo = compiled.as_text()
    assert not re.search(r"convolution\(|cudnn\$conv", hlo)  # no frozen tokenizer in a precomputed run's step
    copies = re.findall(r"= (f32\[[\d,]*\])\{[^}]*\} copy\(", hlo[hlo.index("\nENTRY") :])
    assert len(copies) <= 2, copies


def test_kernel_inventory_counts_a_loop_body_once_per_trip():
    devices = _devices("h200:1")
    mesh = jax.sharding.Mesh(devices, ("x",))
    spec = jax.ShapeDtypeStruct((64, 64), jax.numpy.bfloat16, sharding=jax.sharding.NamedSharding(mesh, jax.P()))

    def f(x, w):  # 5 steps of a gemm and an element-wise tanh that does not fuse into it
        return jax.lax.fori_loop(0, 5, lambda i, x: jax.numpy.tanh(x @ w) * (i + 1), x)

    compiled = aot._compile(jax.jit(f), (spec, spec), mesh)
    inventory = kernels.inventory(compiled.as_text())
    assert inventory.launches["gemm"] == 5 and inventory.unknown_trips == 0
    assert inventory.written["gemm"] == 5 * 64 * 64 * 2
    gemm = next(k for k in inventory.heaviest if k.family == "gemm")
    assert (gemm.launches, gemm.written) == (5, 5 * 64 * 64 * 2) and "dot" in gemm.source, gemm
    assert [k.written for k in inventory.heaviest] == sorted((k.written for k in inventory.heaviest), reverse=True)
    with pytest.raises(ValueError, match="no ENTRY computation"):
        kernels.inventory("HloModule m\n")


def test_unknown_gpu_names_are_clear_errors():
    _devices("h200:1")
    with pytest.raises(ValueError, match="GPU hosts h100:8 or h200:2x8"):
        aot.topology_devices("h200:eight")


def test_gpu_command_line_needs_no_platform_setting():
    _devices("h100:2")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user runs it: the plugin is found
    command = [sys.executable, "-m", "infinity_jax.aot", f"--config={TINY}", "--topology=h100:2", "--mesh=data=2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2 × NVIDIA H100 80GB HBM3)" in result.stdout and "all-reduce" in result.stdout
    assert "of 55.9 GiB: fits" in result.stdout  # 75 % of 80 GB, JAX's default share
