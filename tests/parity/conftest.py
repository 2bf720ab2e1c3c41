"""Parity tests run the official code from the checkout named by INFINITY_OFFICIAL (see infinity_jax/parity.py)."""

import functools
import os

import pytest

from infinity_jax.parity import import_official

OFFICIAL = os.environ.get("INFINITY_OFFICIAL")


@pytest.fixture(scope="session")
def official():
    """import_official bound to the checkout; skips when none is named."""
    if not OFFICIAL:
        pytest.skip("set INFINITY_OFFICIAL to a checkout of github.com/FoundationVision/Infinity")
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    return functools.partial(import_official, OFFICIAL)
