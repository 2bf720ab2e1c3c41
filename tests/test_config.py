"""Config files, argument parsing, validation and the command-line flags of every entry point."""

import os
import subprocess
import sys

import pytest

from infinity_jax import cli, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(spec):
    return cli.load_config_file(os.path.join(ROOT, spec))


def test_infinity_config_sizes_and_tokenizers():
    c = _load("configs/infinity.py:size=layer24c4,res=0.25M")
    assert c.model.size == "infinity_layer24" and (c.model.depth, c.model.embed_dim) == (24, 1536)
    assert c.schedule.resolution == "0.25M" and c.model.bits == 32 and c.bsc.strength == 0.3
    eight = config.validate(_load("configs/infinity.py:size=8b"))
    assert (eight.tokenizer.bits, eight.tokenizer.stride, eight.tokenizer.patchify, eight.model.bits) == (
        14,
        8,
        True,
        56,
    )
    assert config.validate(_load("configs/infinity.py")).model.size == "infinity_2b"


def test_var_config():
    c = config.validate(_load("configs/var.py:size=d36,res=512"))
    assert (c.model.family, c.model.depth, c.model.embed_dim, c.model.shared_aln) == ("var", 36, 2304, True)


def test_parse_arg_types_and_errors():
    parsed = config.parse_arg("n=3,lr=0.5,flag,name=x", n=1, lr=1.0, flag=False, name="y")
    assert (parsed.n, parsed.lr, parsed.flag, parsed.name) == (3, 0.5, True, "x")
    with pytest.raises(ValueError, match="unknown config argument 'sise'; valid arguments: size, res"):
        _load("configs/infinity.py:sise=2b")
    with pytest.raises(ValueError, match=r"'abc' is not a int"):
        config.parse_arg("n=abc", n=1)


def test_validate_refuses_silent_layout_changes():
    c = _load("configs/infinity.py:size=tiny")
    c.model.depth = 3
    with pytest.raises(ValueError, match=r"model.depth=3 \(size tiny has 2\).*model.size=custom"):
        config.validate(c)
    c.model.size = "custom"
    assert config.validate(c).model.depth == 3
    c.model.num_heads = 5
    with pytest.raises(ValueError, match="not divisible"):
        config.validate(c)
    c = _load("configs/infinity.py:size=tiny")
    c.model.bits = 16
    with pytest.raises(ValueError, match=r"model\.bits=16 but the tokenizer gives 32"):
        config.validate(c)
    c = _load("configs/infinity.py:size=tiny")
    c.tokenizer.stride = 12
    with pytest.raises(ValueError, match="power of two"):
        config.validate(c)
    c = _load("configs/infinity.py:size=tiny,res=2M")
    with pytest.raises(ValueError, match="valid resolutions"):
        config.validate(c)


def _describe(*args):
    return subprocess.run(
        [sys.executable, "-m", "infinity_jax.describe", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_overrides_and_summary():
    out = _describe("--config", "configs/infinity.py:size=2b,res=0.06M", "--config.bsc.strength=0.2")
    assert out.returncode == 0, out.stderr
    assert "strength: 0.2" in out.stdout and "parameters: 2,204,564,032" in out.stdout
    assert "1.0: 256x256, K=7, L=521" in out.stdout and "0.333: 144x432, K=7, L=509" in out.stdout


def test_cli_errors_are_one_clear_line():
    out = _describe("--config", "configs/infinity.py:size=tiny", "--config.model.nope=1")
    assert out.returncode != 0
    assert "unknown config key 'model.nope': 'nope' is not in model; valid keys there: attention, bits," in out.stderr
    assert "Traceback" not in out.stderr
    out = _describe("--config", "configs/infinity.py:size=tiny", "--config.model.depth=5")
    assert out.returncode != 0 and "model.depth=5 (size tiny has 2)" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "module, spec",
    [("infinity_jax.train", "configs/infinity.py:size=tiny"), ("infinity_jax.train_tokenizer", "configs/tokenizer.py")],
)
def test_trainers_refuse_to_start_without_a_workdir(module, spec):
    out = subprocess.run(
        [sys.executable, "-m", module, "--config", spec], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "error: --workdir is required" in out.stderr and "Traceback" not in out.stderr
