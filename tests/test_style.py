"""The code is formatted and linted with ruff (configured in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by the test extra")
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff(command):
    out = subprocess.run([RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
