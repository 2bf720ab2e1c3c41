"""Converting official tokenizer state dicts: names and shapes from REFERENCE §6.4, both spellings, loud failures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax.convert import tokenizer as convert
from infinity_jax.convert.common import CheckpointMismatchError, load_torch_state_dict
from infinity_jax.models.bsq_vae import TOKENIZERS, Conv, Downsample, Norm, TokenizerConfig, Upsample
from infinity_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch", reason="torch (the test extra) writes the .pth files and is the conv reference")
F = torch.nn.functional

TINY = TokenizerConfig(bits=8, stride=16, base_ch=32, ch_mult=(1, 2, 1, 1, 1), num_res_blocks=1)


def official_layout(config: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Official parameter names -> torch shapes, written from the description of the official module tree."""
    layout = {}
    ch, mult, blocks = config.base_ch, config.ch_mult, config.num_res_blocks

    def conv(name, cin, cout, k=3):
        layout[f"{name}.conv.weight"], layout[f"{name}.conv.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        layout[f"{name}.norm.weight"], layout[f"{name}.norm.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, k=1)

    conv("encoder.conv_in", 3, ch)
    c = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            resblock(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i < config.num_down:
            conv(f"encoder.down.{i}.downsample.conv", c, c)
    resblock("encoder.mid.block_1", c, c)
    resblock("encoder.mid.block_2", c, c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, config.bits)
    c = ch * mult[-1]
    conv("decoder.conv_in", config.bits, c)
    resblock("decoder.mid.block_1", c, c)
    resblock("decoder.mid.block_2", c, c)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if 1 <= i <= config.num_down:
            conv(f"decoder.up.{i}.upsample.conv", c, c)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3)
    return layout


def unwrapped(name: str) -> str:
    """The loader's other spelling: without the innermost `.conv`/`.norm` (`x.conv1.conv.weight` -> `x.conv1.weight`)."""
    head, module, leaf = name.rsplit(".", 2)
    return f"{head}.{leaf}" if module in ("conv", "norm") else name


def random_state_dict(config, seed=0, spelling="mixed"):
    """Random weights under official names: "wrapped", "plain", or "mixed" (alternating) spellings."""
    rng = np.random.default_rng(seed)
    state = {}
    for i, (name, shape) in enumerate(official_layout(config).items()):
        value = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) == 4 else 1.0)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * value
        plain = spelling == "plain" or (spelling == "mixed" and i % 2 == 0)
        state[unwrapped(name) if plain else name] = value
    state["quantizer.lfq.mask"] = 2 ** np.arange(config.bits - 1, -1, -1, dtype=np.int64)
    return state


def test_the_released_d32_layout_converts_with_every_name_and_shape():
    """270 entries (268 parameters, the mask buffer under two aliases) in both spellings; zero-stride arrays
    keep this cheap."""
    layout = official_layout(TOKENIZERS["d32"])
    assert len(layout) + 2 == 270
    for plain in (True, False):
        state = {(unwrapped(n) if plain else n): np.broadcast_to(np.float32(0), s) for n, s in layout.items()}
        state["quantizer.lfq.mask"] = state["quantize.lfq.mask"] = np.zeros(32, np.int64)
        params = convert.convert_state_dict(state, TOKENIZERS["d32"])
        assert params["encoder"]["down_1"]["block_0"]["nin_shortcut"]["conv"]["kernel"].shape == (1, 1, 128, 256)
        assert params["decoder"]["up_1"]["upsample"]["conv"]["conv"]["kernel"].shape == (3, 3, 256, 256)
        assert sum(x.size for x in jax.tree.leaves(params)) == 110_118_051


def test_converted_weights_land_where_torch_uses_them():
    state = random_state_dict(TINY)
    params = convert.convert_state_dict(state, TINY)
    x = np.random.default_rng(1).standard_normal((2, 16, 12, 32)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)

    def torch_conv(name, inp, **kw):
        weight = state.get(f"{name}.conv.weight", state.get(f"{name}.weight"))
        bias = state.get(f"{name}.conv.bias", state.get(f"{name}.bias"))
        return F.conv2d(inp, torch.from_numpy(weight), torch.from_numpy(bias), **kw)

    def close(ours, ref):
        np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=2e-5)

    block = params["encoder"]["down_0"]["block_0"]
    close(Conv(32).apply({"params": block["conv1"]}, x), torch_conv("encoder.down.0.block.0.conv1", xt, padding=1))
    down = params["encoder"]["down_0"]["downsample"]
    ref = torch_conv("encoder.down.0.downsample.conv", F.pad(xt, (0, 1, 0, 1)), stride=2)
    close(Downsample().apply({"params": down}, x), ref)
    up = params["decoder"]["up_2"]["upsample"]
    ref = torch_conv("decoder.up.2.upsample.conv", F.interpolate(xt, scale_factor=2, mode="nearest"), padding=1)
    close(Upsample().apply({"params": up}, x), ref)
    weight = state.get("encoder.down.0.block.0.norm1.norm.weight", state.get("encoder.down.0.block.0.norm1.weight"))
    bias = state.get("encoder.down.0.block.0.norm1.norm.bias", state.get("encoder.down.0.block.0.norm1.bias"))
    ref = F.group_norm(xt, 32, torch.from_numpy(weight), torch.from_numpy(bias), eps=1e-6)
    close(Norm().apply({"params": block["norm1"]}, x), ref)


def test_forward_pass_of_a_converted_checkpoint_file(tmp_path):
    state = random_state_dict(TINY)
    path = tmp_path / "vae.pth"
    torch.save({"vae": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    tok = Tokenizer(convert.load_official(str(path), TINY), TINY)
    images = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 32, 48, 3)), jnp.float32)
    recon = jax.jit(Tokenizer.decode_latent)(tok, jax.jit(Tokenizer.encode)(tok, images))
    assert recon.shape == images.shape and np.isfinite(np.asarray(recon)).all()
    # The decoder's last bias shifts channel 0 of the (unclamped) output by exactly its value.
    shifted = dict(state)
    key = "decoder.conv_out.bias" if "decoder.conv_out.bias" in state else "decoder.conv_out.conv.bias"
    shifted[key] = state[key] + np.array([0.25, 0, 0], np.float32)
    moved = Tokenizer(convert.convert_state_dict(shifted, TINY), TINY)
    latent = jnp.zeros((1, 2, 3, 8))

    def raw(t):
        return t.module.apply({"params": t.params}, latent, method=lambda m, z: m.decoder(z))

    np.testing.assert_allclose(
        np.asarray(raw(moved) - raw(tok)), np.broadcast_to([0.25, 0, 0], (1, 32, 48, 3)), atol=1e-5
    )
    # The same weights, read from a plain state dict file, give the same parameters.
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "plain.pth")
    plain = load_torch_state_dict(str(tmp_path / "plain.pth"), containers=("vae",))
    jax.tree.map(np.testing.assert_array_equal, convert.convert_state_dict(plain, TINY), tok.params)


def test_every_missing_unexpected_and_misshapen_key_is_reported():
    state = random_state_dict(TINY, spelling="wrapped")
    del state["encoder.conv_in.conv.weight"], state["decoder.mid.block_2.norm2.norm.bias"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    state["decoder.up.0.block.9.conv1.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    state["encoder.conv_out.conv.weight"] = np.zeros((9, 32, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        convert.convert_state_dict(state, TINY)
    e = error.value
    assert e.missing == [
        "decoder.mid.block_2.norm2.norm.bias or decoder.mid.block_2.norm2.bias",
        "encoder.conv_in.conv.weight or encoder.conv_in.weight",
    ]
    assert e.unexpected == ["decoder.up.0.block.9.conv1.conv.weight", "encoder.extra.weight"]
    assert len(e.misshapen) == 1 and "encoder.conv_out.conv.weight: (9, 32, 3, 3)" in e.misshapen[0]
    assert "2 missing" in str(e) and "2 unexpected" in str(e) and "1 wrong shape" in str(e)
    # A checkpoint of another d is refused, not silently truncated.
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        convert.convert_state_dict(random_state_dict(TINY), TokenizerConfig(**{**TINY.__dict__, "bits": 16}))
