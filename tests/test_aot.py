"""Ahead-of-time compilation of the train step for a real TPU topology, on CPU (needs libtpu, in the test extra)."""

import importlib.util
import subprocess
import sys

import jax
import pytest

from infinity_jax import aot
from infinity_jax.cli import load_config_file
from infinity_jax.train import perceptual

TINY = "configs/infinity.py:size=tiny,res=0.004M,tokenizer=tiny,t5=tiny,batch=8"


def _devices(name):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[test]' installs it)")
    return aot.topology_devices(name)


def test_tiny_train_step_compiles_for_v5e_and_reports_memory():
    devices = _devices("v5e:2x2")
    assert len(devices) == 4 and aot.hbm_bytes(devices[0]) == 16 << 30
    _, report = aot.compile_train_step(load_config_file(TINY), devices, aot.parse_mesh("data=2,fsdp=2"), 1.0)
    assert report.mesh == {"data": 2, "fsdp": 2, "tensor": 1} and report.chips == 4
    assert 0 < report.argument_bytes < 1 << 28 and report.temp_bytes > 0 and report.fits
    # The compiler's per-chip count (which also sees element-wise work) against our analytic count of matmuls
    # and convolutions over all chips: the same order.
    assert 0.8 < report.compiler_flops * report.chips / report.analytic_flops < 2.0
    names = [name for name, _, _ in report.largest]
    assert "cfg_uncond" in names and any("fsdp" in spec for _, _, spec in report.largest)
    assert any(line.endswith("fits") for line in report.lines(0.45))


def test_guided_generation_compiles_with_sharded_parameters():
    devices = _devices("v5e:2x2")
    _, report = aot.compile_generation(load_config_file(TINY), devices, aot.parse_mesh("data=2,fsdp=2"), 1.0)
    assert report.fits and report.schedule == "generate 1.0@0.004M batch 1" and report.temp_bytes > 0
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
    with pytest.raises(ValueError, match="cannot describe TPU topology 'v9z:3x3'"):
        aot.topology_devices("v9z:3x3")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        aot.parse_mesh("data=2,model=2")


def test_tokenizer_train_step_compiles_with_its_discriminator_and_lpips():
    devices = _devices("v5e:2x2")
    config = load_config_file("configs/tokenizer.py:tokenizer=tiny,res=0.004M,batch=8")
    _, report = aot.compile_tokenizer_step(config, devices, aot.parse_mesh("data=1,fsdp=4"), 1.0)
    assert report.fits and report.schedule == "tokenizer 1.0@0.004M" and report.temp_bytes > 0
    # The frozen LPIPS-VGG16 (replicated, 59 MB in float32) is among each chip's arguments, beside the two networks
    # and their Adam states (54 MB per chip without LPIPS).
    lpips_bytes = sum(x.nbytes for x in jax.tree.leaves(perceptual.load_params()))
    assert report.argument_bytes > lpips_bytes + 40e6
    assert 0.5 < report.compiler_flops * report.chips / report.analytic_flops < 3.0
    names = [name for name, _, _ in report.largest]
    assert all(name.startswith(("generator/", "discriminator/")) for name in names)


def test_configs_without_a_train_step_are_clear_errors():
    with pytest.raises(ValueError, match="no train step to compile"):
        aot._compile_fn(load_config_file("configs/var.py:size=d16"), generate=False)
    with pytest.raises(ValueError, match="--generate needs a transformer config"):
        aot._compile_fn(load_config_file("configs/tokenizer.py:tokenizer=tiny"), generate=True)
    assert aot._compile_fn(load_config_file(TINY), generate=True) is aot.compile_generation
