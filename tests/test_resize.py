"""Resizing equals torch.nn.functional.interpolate (area; bilinear and bicubic, align_corners=False)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax.ops import area_resize, bilinear_resize, pixel_shuffle, pixel_unshuffle, resize

torch = pytest.importorskip("torch", reason="torch (the test extra) is the reference for resizing")
F = torch.nn.functional

FIXED_PAIRS = [((64, 64), (1, 1)), ((64, 64), (45, 45)), ((37, 37), (111, 111)), ((1, 1), (64, 64))]


def _size_pairs():
    rng = np.random.default_rng(1234)
    pairs = list(FIXED_PAIRS)
    while len(pairs) < 28:
        in_hw = tuple(int(v) for v in rng.integers(1, 80, size=2))
        out_hw = tuple(int(v) for v in rng.integers(1, 120, size=2))
        pairs.append((in_hw, out_hw))
    return pairs


def _torch_resize(x, size, method):
    kwargs = {} if method == "area" else {"align_corners": False}
    out = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode=method, **kwargs)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("method", ["area", "bilinear", "bicubic"])
def test_matches_torch_on_random_size_pairs(method):
    rng = np.random.default_rng(0)
    pairs = _size_pairs()
    assert len(pairs) >= 20 and any(i[0] > o[0] for i, o in pairs) and any(i[0] < o[0] for i, o in pairs)
    for in_hw, out_hw in pairs:
        x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
        ours = np.asarray(resize(jnp.asarray(x), out_hw, method))
        np.testing.assert_allclose(ours, _torch_resize(x, out_hw, method), atol=1e-5, err_msg=f"{in_hw}->{out_hw}")


def test_trilinear_with_one_frame_is_bilinear():
    """The official code resizes (B, d, 1, h, w) with 'trilinear'; with T=1 that must be our bilinear."""
    x = np.random.default_rng(1).standard_normal((2, 7, 5, 4)).astype(np.float32)
    tri = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2)[:, :, None], size=(1, 16, 11), mode="trilinear")
    np.testing.assert_allclose(
        np.asarray(bilinear_resize(jnp.asarray(x), (16, 11))), tri[:, :, 0].permute(0, 2, 3, 1).numpy(), atol=1e-6
    )


def test_identity_dtype_leading_axes_and_jit():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 9, 6, 4)), jnp.bfloat16)
    assert area_resize(x, (9, 6)) is x
    y = jax.jit(lambda a: area_resize(a, (3, 2)))(x)
    assert y.shape == (2, 3, 3, 2, 4) and y.dtype == jnp.bfloat16
    # Area down-sampling by an exact factor is a block mean.
    block_mean = x.astype(jnp.float32).reshape(2, 3, 3, 3, 2, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(block_mean), atol=1e-2)


def test_bad_arguments():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="unknown resize method 'lanczos'"):
        resize(x, (2, 2), "lanczos")
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, C\]"):
        resize(jnp.zeros((4, 4)), (2, 2), "area")
    with pytest.raises(ValueError, match="positive"):
        resize(x, (0, 2), "bilinear")


def test_pixel_unshuffle_matches_torch_and_inverts():
    x = np.random.default_rng(3).standard_normal((2, 6, 4, 5)).astype(np.float32)
    ours = np.asarray(pixel_unshuffle(jnp.asarray(x)))
    ref = F.pixel_unshuffle(torch.from_numpy(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(ours))), x)
    with pytest.raises(ValueError, match="divisible by 2, got 5x4"):
        pixel_unshuffle(jnp.zeros((1, 5, 4, 3)))
    with pytest.raises(ValueError, match="channels divisible by 4"):
        pixel_shuffle(jnp.zeros((1, 2, 2, 6)))
