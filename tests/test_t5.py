"""The Flax T5 encoder against transformers' PyTorch T5EncoderModel, through our Hugging Face folder loader."""

import flax.linen as nn
import numpy as np
import pytest

from infinity_jax.convert import t5 as convert_t5
from infinity_jax.convert.common import CheckpointMismatchError
from infinity_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets
from infinity_jax.text import load_text_tokenizer, tokenize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER = "tests/assets/t5_tokenizer/tokenizer.json"
CAPTIONS = ["a photo of a cat sitting on a mat", "hi", "a 3d render of the ringed planet emoji, travel and places"]


def _hf_folder(tmp_path, proj: str, full_model: bool):
    hf = transformers.T5Config(
        vocab_size=32128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj=proj
    )
    torch.manual_seed(0)
    cls = transformers.T5ForConditionalGeneration if full_model else transformers.T5EncoderModel
    model = cls(hf).eval()
    folder = str(tmp_path / proj)
    model.save_pretrained(folder)
    return folder, transformers.T5EncoderModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("proj, full_model", [("gated-gelu", True), ("relu", False)])
def test_encoder_equals_transformers(tmp_path, proj, full_model):
    folder, reference = _hf_folder(tmp_path, proj, full_model)
    params, config = convert_t5.load_pretrained(folder)
    assert config.feed_forward_proj == proj
    tokens, mask = tokenize(load_text_tokenizer(TOKENIZER), CAPTIONS, max_length=24)
    assert mask.sum(1).tolist()[1] == 2  # "hi" + EOS: padding in the batch
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(tokens.astype(np.int64)), attention_mask=torch.tensor(mask.astype(np.int64))
        ).last_hidden_state.numpy()
    out = np.asarray(T5Encoder(config).apply({"params": params}, tokens, mask))
    scale = np.abs(expected).max()
    assert np.abs(out - expected)[mask].max() / scale < 1e-5
    assert np.abs(out - expected).max() / scale < 1e-5  # padded rows too


def test_relative_buckets_known_values():
    buckets = np.asarray(relative_position_buckets(200, 32, 128))
    # Keys after the query use buckets 16..31; exact below 8, then log-spaced; 128+ saturates at 15 / 31.
    assert buckets[0, 0] == 0 and buckets[0, 1] == 17 and buckets[1, 0] == 1 and buckets[0, 7] == 23
    assert buckets[0, 199] == 31 and buckets[199, 0] == 15
    assert buckets[0, 8] == 24 and buckets[8, 0] == 8


def test_converter_lists_missing_and_unexpected(tmp_path):
    folder, _ = _hf_folder(tmp_path, "gated-gelu", False)
    from safetensors.numpy import load_file

    state = load_file(f"{folder}/model.safetensors")
    state.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight")
    state["encoder.block.1.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)
    config = T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    with pytest.raises(CheckpointMismatchError) as error:
        convert_t5.convert_state_dict(state, config)
    assert error.value.missing == ["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    assert error.value.unexpected == ["encoder.block.1.layer.0.SelfAttention.extra.weight"]


def test_tokenize_pads_and_truncates():
    tokens, mask = tokenize(load_text_tokenizer(TOKENIZER), ["a photo of a cat", "word " * 100], max_length=16)
    assert tokens.shape == (2, 16) and tokens.dtype == np.int32
    assert tokens[0, :8].tolist() == [3, 9, 1202, 13, 3, 9, 1712, 1] and mask[0].sum() == 8
    assert (tokens[0, 8:] == 0).all() and mask[1].all() and tokens[1, -1] == 1  # EOS kept on truncation


def test_sharded_and_bfloat16_encoders_agree_with_the_plain_one(tmp_path):
    """Batch over all 8 devices (the trainer's default text rules), also with heads and FFN split over a tensor axis;
    bf16 weights and compute stay close to float32 (the frozen encoder runs in bf16 by default)."""
    import jax
    import jax.numpy as jnp

    from infinity_jax import sharding

    folder, _ = _hf_folder(tmp_path, "gated-gelu", False)
    params, config = convert_t5.load_pretrained(folder)
    tokens, mask = tokenize(load_text_tokenizer(TOKENIZER), CAPTIONS * 3 + ["x"] * 7, max_length=16)
    plain = np.asarray(T5Encoder(config).apply({"params": params}, tokens, mask))
    layouts = {
        (8, 1, 1): sharding.TOKENIZER_RULES,
        (2, 2, 2): (("act_batch", ("data", "fsdp")), ("t5_heads", "tensor"), ("t5_mlp", "tensor")),
    }
    for (data, fsdp, tensor), rules in layouts.items():
        mesh = sharding.make_mesh(data, fsdp, tensor)
        init = lambda key: T5Encoder(config).init(key, tokens[:1], mask[:1])["params"]  # noqa: E731
        abstract = sharding.abstract_arrays(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
        placed = jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract))
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

        def encode(p, t, m, rules=rules):
            with nn.logical_axis_rules(rules):
                return T5Encoder(config).apply({"params": p}, t, m)

        with jax.set_mesh(mesh):
            out = jax.jit(encode)(placed, jax.device_put(tokens, batch), jax.device_put(mask, batch))
        assert out.addressable_shards[0].data.shape[0] == len(tokens) // (data * fsdp)  # batch-sharded
        np.testing.assert_allclose(np.asarray(out), plain, atol=1e-5 * np.abs(plain).max())
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out16 = np.asarray(T5Encoder(config, jnp.bfloat16).apply({"params": half}, tokens, mask))
    assert out16.dtype == np.float32  # the final norm is float32
    assert np.abs(out16 - plain)[mask].max() / np.abs(plain).max() < 5e-2
