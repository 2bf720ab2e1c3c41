"""`python -m infinity_jax.convert`: official files -> converted checkpoints (layout read off the names and shapes),
sharded folders, bf16, loud failures, the trainer's loader for either block layout, and `export` back to identical
official tensors; T5 from a Hugging Face folder or a hub name in the cache."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert_tokenizer import TINY as TINY_TOKENIZER
from test_convert_tokenizer import random_state_dict as tokenizer_state
from test_convert_transformer import TINY, random_state_dict, spec_layout

from infinity_jax import schedules, sharding
from infinity_jax.convert import converted
from infinity_jax.convert import transformer as convert_transformer
from infinity_jax.convert.__main__ import main
from infinity_jax.models.transformer import Infinity, TransformerConfig

torch = pytest.importorskip("torch")


def _official_tiny():
    """A tiny Infinity state dict under the released names, blocks in 2 chunks, zero_k_bias buffers included."""
    return random_state_dict(spec_layout(64, 2, 2, 256, 8, ct5=256, maxlen=16, chunks=2))


def _save(state, path):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return str(path)


def _loaded(path):
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def test_transformer_converts_with_its_layout_and_exports_back(tmp_path):
    state = _official_tiny()
    src = _save(state, tmp_path / "infinity_tiny.pth")
    assert main(["transformer", src, str(tmp_path / "ckpt")]) == 0
    loaded = converted.load(str(tmp_path / "ckpt"))
    assert loaded.kind == "transformer" and loaded.layout == TransformerConfig(**{**TINY.__dict__, "scan_blocks": True})
    expected = convert_transformer.stack_blocks(convert_transformer.convert_state_dict(state, TINY), TINY.depth)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, expected)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back.pth"), "--block_chunks", "2"]) == 0
    back = _loaded(tmp_path / "back.pth")
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_the_trainer_loader_takes_either_block_layout_and_checks_the_layout(tmp_path):
    state = _official_tiny()
    src = _save(state, tmp_path / "tiny.pth")
    main(["transformer", src, str(tmp_path / "scanned")])
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    for scan in (False, True):
        config = TransformerConfig(**{**TINY.__dict__, "scan_blocks": scan})
        schedule = schedules.Schedule(((1, 1),))
        init = lambda key, c=config, s=schedule: Infinity(c).init(  # noqa: E731
            key, jnp.zeros((1, 0, 8)), s, text=jnp.zeros((1, 1, 256)), text_mask=jnp.ones((1, 1), bool)
        )["params"]
        abstract = sharding.abstract_arrays(jax.eval_shape(init, jax.random.key(0)), mesh, sharding.TRANSFORMER_RULES)
        expected = convert_transformer.convert_state_dict(state, config)
        for where in (str(tmp_path / "scanned"), src):  # the converted folder, or the official file directly
            params = converted.load_transformer(where, config, abstract)
            jax.tree.map(np.testing.assert_array_equal, params, expected)
            leaf = params["blocks"]["layers" if scan else "block_0"]["ffn"]["fc1"]["kernel"]
            assert (
                leaf.sharding == (abstract["blocks"]["layers" if scan else "block_0"]["ffn"]["fc1"]["kernel"]).sharding
            )
    wider = TransformerConfig(**{**TINY.__dict__, "embed_dim": 128, "ffn_dim": 512})
    with pytest.raises(ValueError, match="embed_dim: checkpoint 64, config 128"):
        converted.load_transformer(str(tmp_path / "scanned"), wider, None)


def test_sharded_folders_and_bfloat16(tmp_path):
    from safetensors.numpy import save_file

    state = _official_tiny()
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: state[n] for n in part}, str(folder / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert main(["transformer", str(folder), str(tmp_path / "ckpt"), "--dtype", "bfloat16", "--no-scan_blocks"]) == 0
    loaded = converted.load(str(tmp_path / "ckpt"))
    assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {jnp.dtype(jnp.bfloat16)}
    expected = convert_transformer.convert_state_dict(state, TINY)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, jnp.asarray(b, jnp.bfloat16)), loaded.params, expected)
    os.remove(folder / "model-00002-of-00002.safetensors")
    assert main(["transformer", str(folder), str(tmp_path / "ckpt2")]) == 1


def test_mismatches_fail_naming_every_key(tmp_path, capsys):
    state = _official_tiny()
    del state["block_chunks.1.module.0.ffn.fc2.bias"]
    state["block_chunks.0.module.0.sa.unknown"] = np.zeros(2, np.float32)
    state["head.bias"] = np.zeros(3, np.float32)
    assert main(["transformer", _save(state, tmp_path / "bad.pth"), str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert "block_chunks.1.module.0.ffn.fc2.bias" in err and "block_chunks.0.module.0.sa.unknown" in err
    assert "head.bias: (3,)" in err and not os.path.exists(tmp_path / "ckpt")


def test_tokenizer_converts_and_exports_back(tmp_path):
    state = tokenizer_state(TINY_TOKENIZER, spelling="wrapped")
    torch.save({"vae": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "vae.pth")
    assert main(["tokenizer", str(tmp_path / "vae.pth"), str(tmp_path / "ckpt")]) == 0
    kind, layout, _ = converted.layout_of(str(tmp_path / "ckpt"))
    assert (kind, layout) == ("tokenizer", TINY_TOKENIZER)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back.safetensors")]) == 0
    from safetensors.numpy import load_file

    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_var_files_are_told_apart(tmp_path):
    from test_var import SCHEDULE, TINY_VQ, _random_state
    from test_var import TINY as TINY_VAR

    from infinity_jax.convert import vqvae as convert_vqvae

    random = _random_state(convert_transformer.official_layout(TINY_VAR))
    params = convert_transformer.convert_state_dict(random, TINY_VAR)
    var = convert_transformer.export_state_dict(params, TINY_VAR, schedule=SCHEDULE)  # with lvl_1L, as released
    vae = _random_state(convert_vqvae.official_layout(TINY_VQ))
    assert main(["var", _save(var, tmp_path / "var.pth"), str(tmp_path / "var")]) == 0
    assert main(["var", _save(vae, tmp_path / "vae.pth"), str(tmp_path / "vae")]) == 0
    assert converted.layout_of(str(tmp_path / "vae"))[:2] == ("vqvae", TINY_VQ)
    kind, layout, schedule = converted.layout_of(str(tmp_path / "var"))
    assert kind == "transformer" and layout.vocab == 64 and layout.positions == "absolute"
    assert schedule == SCHEDULE  # (1, 2, 3, 4): no released resolution, read off the lvl_1L buffer
    del var["lvl_1L"]  # then only a released resolution's token count identifies the schedule
    assert main(["var", _save(var, tmp_path / "var2.pth"), str(tmp_path / "var2")]) == 1
    assert main(["var", _save({"x": np.zeros(1, np.float32)}, tmp_path / "x.pth"), str(tmp_path / "x")]) == 1


def test_t5_from_a_folder_and_from_the_hub_cache(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(hf).eval()
    snapshot = tmp_path / "cache" / "models--org--tiny-t5" / "snapshots" / "abc123"
    model.save_pretrained(str(snapshot))
    (tmp_path / "cache" / "models--org--tiny-t5" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--tiny-t5" / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "infinity_jax.convert", *args], env=env, capture_output=True, text=True, timeout=300
    )
    done = run("t5", "org/tiny-t5", str(tmp_path / "t5"), "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    missing = run("t5", "org/not-cached", str(tmp_path / "t5b"))
    assert missing.returncode == 1 and "not in the Hugging Face cache" in missing.stderr
    assert main(["t5", str(snapshot), str(tmp_path / "t5_fp32")]) == 0
    assert main(["export", str(tmp_path / "t5_fp32"), str(tmp_path / "back.pth")]) == 0
    reloaded = transformers.T5EncoderModel(hf)
    reloaded.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    assert converted.load(str(tmp_path / "t5")).layout.d_model == 64
