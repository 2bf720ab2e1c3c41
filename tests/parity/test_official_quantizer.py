"""Parity of the quantizer and Bitwise Self-Correction with the official PyTorch code.

The official code is never part of this repository: point INFINITY_OFFICIAL at a checkout of
github.com/FoundationVision/Infinity (it needs torch and einops) to run these tests, e.g.
  INFINITY_OFFICIAL=/path/to/Infinity python -m pytest tests/parity -s
Each test prints the largest difference it saw.
"""

import types
from unittest import mock

import numpy as np
import pytest

from infinity_jax import quantizer, schedules

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def official_quant(official):
    """The official MultiScaleBSQ module and BitwiseSelfCorrection module."""
    return (
        official("infinity.models.bsq_vae.multiscale_bsq"),
        official("infinity.models.bitwise_self_correction"),
    )


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _run_official_bsc(official_quant, z, schedule, strength, patchify, seed):
    """Runs the official flip_requant and records the uniform draws and flip probabilities it used."""
    msbsq, bsc = official_quant
    d = z.shape[-1]
    quant = msbsq.MultiScaleBSQ(dim=d, codebook_size=2**d, new_quant=True, schedule_mode="dynamic")
    vae = types.SimpleNamespace(quantizer=quant, codebook_dim=d)
    args = types.SimpleNamespace(
        noise_apply_layers=len(schedule.scales),
        noise_apply_requant=1,
        noise_apply_strength=strength,
        apply_spatial_patchify=int(patchify),
        debug_bsc=0,
    )
    draws, probs = [], []
    real_rand, real_randint = torch.rand, np.random.randint

    def rand(*shape, **kw):
        draws.append(real_rand(*shape, **kw))
        return draws[-1]

    def randint(*a, **kw):
        probs.append(real_randint(*a, **kw) * 0.01)
        return probs[-1] / 0.01

    torch.manual_seed(seed)
    np.random.seed(seed)
    with mock.patch.object(torch, "rand", rand), mock.patch.object(np.random, "randint", randint):
        inputs, labels = bsc.BitwiseSelfCorrection(vae, args).flip_requant(
            [(1, h, w) for h, w in schedule.scales], None, _nchw(z), "cpu"
        )
    masks = [(u < p).numpy()[:, 0] for u, p in zip(draws, probs, strict=True)]  # (B,1,h,w,d) -> (B,h,w,d)
    return inputs.numpy(), torch.cat(labels, 1).numpy(), masks


@pytest.mark.parametrize("template,resolution", [(1.0, "0.06M"), (0.333, "0.25M"), (1.75, "0.06M")])
def test_multiscale_bsq_matches_official(official_quant, template, resolution):
    msbsq, _ = official_quant
    schedule = schedules.infinity_schedule(template, resolution)
    d = 32
    h, w = schedule.grid
    z = np.random.default_rng(0).standard_normal((2, h, w, d)).astype(np.float32)
    quant = msbsq.MultiScaleBSQ(dim=d, codebook_size=2**d, new_quant=True, schedule_mode="dynamic")
    with torch.no_grad():
        latent, _, bits, *_ = quant(_nchw(z).unsqueeze(2), scale_schedule=[(1, a, b) for a, b in schedule.scales])
    ours = quantizer.multiscale_quantize(z, schedule)
    latent_err = np.abs(np.asarray(ours.latent) - latent.permute(0, 2, 3, 1).numpy()).max()
    bit_mismatch = sum(int((np.asarray(o) != t[:, 0].numpy()).sum()) for o, t in zip(ours.bits, bits, strict=True))
    print(f"\nmultiscale BSQ {schedule.name}: max |latent diff| = {latent_err:.2e}, bit mismatches = {bit_mismatch}")
    assert bit_mismatch == 0
    assert latent_err < 1e-5


@pytest.mark.parametrize(
    "template,resolution,patchify", [(1.0, "0.06M", False), (0.5, "0.25M", False), (1.333, "0.06M", True)]
)
def test_bsc_matches_official(official_quant, template, resolution, patchify):
    schedule = schedules.infinity_schedule(template, resolution)
    if patchify:
        schedule = schedule.upsampled(2)
    d = 14 if patchify else 32
    h, w = schedule.grid
    z = np.random.default_rng(1).standard_normal((3, h, w, d)).astype(np.float32)
    inputs, labels, masks = _run_official_bsc(official_quant, z, schedule, 0.3, patchify, seed=2)
    assert sum(m.sum() for m in masks) > 0, "the official run flipped nothing; the comparison would be vacuous"
    ours = quantizer.self_correct(z, schedule, masks, patchify=patchify)
    input_err = np.abs(np.asarray(ours.inputs) - inputs).max()
    label_mismatch = int((np.asarray(ours.labels) != labels).sum())
    print(
        f"\nBSC {schedule.name} patchify={patchify}: flipped {sum(int(m.sum()) for m in masks)} bits; "
        f"max |input diff| = {input_err:.2e}, label mismatches = {label_mismatch} / {labels.size}"
    )
    assert ours.labels.shape == labels.shape and ours.inputs.shape == inputs.shape
    assert label_mismatch == 0
    assert input_err < 1e-5
