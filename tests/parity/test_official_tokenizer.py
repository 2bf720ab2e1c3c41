"""Parity of the BSQ-VAE with the official PyTorch tokenizer, same random weights, float32.

Run with INFINITY_OFFICIAL=/path/to/Infinity (see conftest.py). Prints the measured relative errors.
"""

import os

import numpy as np
import pytest

from infinity_jax import parity, schedules
from infinity_jax.convert import tokenizer as convert
from infinity_jax.models.bsq_vae import TOKENIZERS
from infinity_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
OFFICIAL = os.environ.get("INFINITY_OFFICIAL")


def _official_vae(official, name):
    config = TOKENIZERS[name]
    vae = parity.official_tokenizer(OFFICIAL, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # GroupNorm starts at (1, 0): perturb it so that the affine parameters are tested too
        for key, value in vae.state_dict().items():
            if ".norm." in key:
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
    return vae, config


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name,template", [("d32", 1.0), ("d32", 0.5), ("d14_f8", 1.333)])
def test_tokenizer_matches_official(official, name, template):
    vae, config = _official_vae(official, name)
    tok = Tokenizer(convert.convert_state_dict(vae.state_dict(), config), config)
    schedule = schedules.infinity_schedule(template, "0.06M")
    height, width = schedule.pixel_size
    images = np.random.default_rng(0).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        latent_ref = vae.encoder(_nchw(images)).permute(0, 2, 3, 1).numpy()
        decoded_ref = vae.decoder(torch.from_numpy(latent_ref).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        _, _, _, bits_ref, _, _ = vae.encode(
            _nchw(images), [(1, h, w) for h, w in tok.latent_schedule(schedule).scales]
        )
    latent = tok.encode(images)
    decoded = tok.module.apply({"params": tok.params}, latent_ref, method=lambda m, z: m.decoder(z))
    latent_err, decoded_err = _rel(latent, latent_ref), _rel(decoded, decoded_ref)
    ours_bits = tok.tokenize(images, schedule)
    if config.patchify:
        bits_ref = [torch.nn.functional.pixel_unshuffle(b[:, 0].permute(0, 3, 1, 2).float(), 2) for b in bits_ref]
        bits_ref = [b.permute(0, 2, 3, 1).numpy() for b in bits_ref]
    else:
        bits_ref = [b[:, 0].numpy() for b in bits_ref]
    mismatched = sum(int((np.asarray(a) != b).sum()) for a, b in zip(ours_bits, bits_ref, strict=True))
    total = sum(b.size for b in bits_ref)
    print(
        f"\n{name} {schedule.name} {height}x{width}: encoder latent rel err {latent_err:.2e}, "
        f"decoder output rel err {decoded_err:.2e}, bits differing {mismatched}/{total}"
    )
    assert latent.shape == latent_ref.shape and decoded.shape == decoded_ref.shape == images.shape
    assert latent_err <= 1e-4 and decoded_err <= 1e-4
    assert mismatched <= total * 1e-4  # a bit may flip only where the latent is within float error of zero
