"""The transformer's trainer end to end on real images (tiny model, random frozen towers) and its parts."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infinity_jax import schedules
from infinity_jax.cli import load_config_file
from infinity_jax.models.transformer import Infinity
from infinity_jax.train import checkpoint, losses, optim
from infinity_jax.train.loop import NonFiniteLossError
from infinity_jax.train.trainer import train, transformer_config

SET = "tests/assets/emoji3d/set/metadata.jsonl"
TOKENIZER = "tests/assets/t5_tokenizer/tokenizer.json"
TINY = "configs/infinity.py:size=tiny,res=0.004M,tokenizer=tiny,t5=tiny,batch=8,classes=10"
OVERRIDES = [
    f"--config.data.path={SET}",
    "--config.tokenizer.checkpoint=random",
    "--config.text.checkpoint=random",
    f"--config.text.tokenizer={TOKENIZER}",
]


def tiny_config(cond="text", steps=10, **train):
    config = load_config_file(f"{TINY},cond={cond}")
    config.data.path = SET
    config.tokenizer.checkpoint = "random"
    if cond == "text":
        config.text.checkpoint, config.text.tokenizer = "random", TOKENIZER
    config.optim.lr = 1e-3
    config.train.num_steps, config.train.log_every, config.train.checkpoint_every = steps, 1, 1000
    config.train.update(train)
    return config


def _losses(history):
    return np.asarray([r["loss"] for r in history])


# -- loss and optimizer ------------------------------------------------------------------------------------------


def test_bit_cross_entropy_known_values():
    bits = jnp.asarray([[[0, 1, 1, 0]]])
    assert np.allclose(losses.bit_cross_entropy(jnp.zeros((1, 1, 4, 2)), bits), np.log(2))
    confident = jax.nn.one_hot(bits, 2) * 30.0
    assert losses.bit_cross_entropy(confident, bits) < 1e-12
    assert losses.bit_accuracy(confident, bits) == 1.0 and losses.bit_accuracy(-confident, bits) == 0.0
    # Label smoothing ε: the target is (1 − ε/2, ε/2), so a perfect prediction still pays ε/2·30 per bit.
    assert np.allclose(losses.bit_cross_entropy(confident, bits, 0.1), 0.05 * 30, rtol=1e-5)


def test_scale_weights_sum_to_one_with_sqrt_shares():
    schedule = schedules.infinity_schedule(1.0, "0.06M")
    weights = losses.token_weights(schedule)
    assert np.isclose(weights.sum(), 1.0)
    shares = np.asarray([w.sum() for w in np.split(weights, np.cumsum(schedule.tokens_per_scale)[:-1])])
    expected = np.sqrt(schedule.tokens_per_scale) / np.sqrt(schedule.tokens_per_scale).sum()
    np.testing.assert_allclose(shares, expected, rtol=1e-6)
    np.testing.assert_allclose(losses.token_weights(schedule, False), 1 / schedule.num_tokens)


def _boxed_params(config):
    """The tiny text model's parameters with their logical axis names (shapes only)."""
    model = Infinity(transformer_config(config))
    schedule = schedules.infinity_schedule(1.0, "0.004M")

    def init(key):
        return model.init(key, jnp.zeros((1, 20, 16)), schedule, jnp.zeros((1, 4, 256)), jnp.ones((1, 4), bool))

    return jax.eval_shape(init, jax.random.key(0))["params"]


def test_weight_decay_only_on_kernels_and_embeddings():
    mask = optim.decay_mask(_boxed_params(tiny_config()))  # boxed, as the optimizer sees it at init
    flat = {
        "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    decayed = {k for k, v in flat.items() if v}
    assert "blocks/block_0/sa/qkv/kernel" in decayed and "head/kernel" in decayed and "word_embed/kernel" in decayed
    for name in ("lvl_embed/embedding", "pos_start", "cfg_uncond", "blocks/block_0/ada_gss", "blocks/block_0/sa/q_bias",
                 "blocks/block_0/sa/scale_mul", "text_pool/query", "head/bias", "text_norm/scale"):  # fmt: skip
        assert not flat[name], name


def test_learning_rate_warmup_then_cosine():
    config = tiny_config()
    config.optim.update(lr=-1.0, tblr=6e-3, warmup_steps=10, schedule="cosine", end_ratio=0.1)
    schedule = optim.learning_rate_schedule(config.optim, global_batch=512, total_steps=110)
    peak = 6e-3 * 512 / 256
    assert schedule(0) == 0 and np.isclose(schedule(5), peak / 2) and np.isclose(schedule(10), peak)
    assert np.isclose(schedule(60), peak * 0.55, rtol=1e-5) and np.isclose(schedule(110), peak * 0.1, rtol=1e-5)


# -- training runs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", ["text", "class"])
def test_tiny_model_learns_on_real_images_and_samples(tmp_path, cond):
    config = tiny_config(cond, steps=200, log_every=50)
    config.mesh.num_devices = 1
    _, history = train(config, str(tmp_path))
    loss = _losses(history)
    assert [r["step"] for r in history] == [50, 100, 150, 200]
    assert loss[-1] < 0.8 * loss[0] < 0.8 * np.log(2), loss
    # acc/s0 is the one-token first scale's bit accuracy on the last batch: 128 bits, so a step of 1/128; chance is 0.5.
    assert history[-1]["acc"] > 0.7 and history[-1]["acc/s0"] >= 0.875
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["loss"] for r in lines] == list(loss)
    assert {"loss/s2", "acc/s1", "grad_norm", "param_norm", "learning_rate", "tokens_per_s"} <= set(lines[-1])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    # The run samples as it is: its newest checkpoint with the frozen towers its config names.
    from infinity_jax.sample import main as sample

    what = ["--prompt", "a red heart"] if cond == "text" else ["--class_id", "3"]
    assert sample(["--run", str(tmp_path), *what, "--batch", "1", "--out", str(tmp_path / "samples")]) == 0
    assert Image.open(tmp_path / "samples" / "sample_000.png").size == (64, 64)


def _on_mesh(steps, data, fsdp, tensor):
    config = tiny_config(steps=steps)
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor, num_devices=data * fsdp * tensor)
    return config


def test_meshes_give_the_same_losses_and_checkpoints_move_between_them(tmp_path):
    state, on_222 = train(_on_mesh(4, 2, 2, 2), str(tmp_path / "222"))
    _, on_811 = train(_on_mesh(2, 8, 1, 1), str(tmp_path / "811"))
    _, on_111 = train(_on_mesh(1, 1, 1, 1), str(tmp_path / "111"))
    np.testing.assert_allclose(_losses(on_811), _losses(on_222)[:2], atol=1e-5)
    np.testing.assert_allclose(_losses(on_111), _losses(on_222)[:1], atol=1e-5)
    # The (8, 1, 1) run's checkpoint at step 2 resumes on (2, 2, 2) and continues as the (2, 2, 2) run did.
    _, resumed = train(_on_mesh(4, 2, 2, 2), str(tmp_path / "811"))
    assert [r["step"] for r in resumed] == [3, 4]
    np.testing.assert_allclose(_losses(resumed), _losses(on_222)[2:], rtol=1e-5)

    # Every parameter is laid out as the rules say, and Adam's moments like their parameters.
    rules = dict(tiny_config().sharding.rules)
    boxes = jax.tree_util.tree_leaves(
        _boxed_params(tiny_config()), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    leaves = jax.tree_util.tree_leaves(state.params)
    assert len(boxes) == len(leaves) > 40
    for box, leaf in zip(boxes, leaves, strict=True):
        expected = tuple(rules.get(name) for name in box.names)
        spec = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        assert spec == expected, (box.names, spec)
    kernel = state.params["blocks"]["block_0"]["ffn"]["fc1"]["kernel"]  # [embed, mlp] -> (fsdp, tensor)
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    mu = state.opt_state[1][0].mu["blocks"]["block_0"]["ffn"]["fc1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    runs = {}
    for accum in (1, 2):
        config = tiny_config(steps=3, grad_accum=accum)
        config.bsc.strength, config.model.cond_drop_rate = 0.0, 0.0  # the same targets in both runs
        runs[accum] = train(config, str(tmp_path / str(accum)))[1]
    np.testing.assert_allclose(_losses(runs[2]), _losses(runs[1]), rtol=2e-5)
    np.testing.assert_allclose(runs[2][-1]["grad_norm"], runs[1][-1]["grad_norm"], rtol=1e-4)


def _train_command(workdir, steps, *extra):
    return [sys.executable, "-m", "infinity_jax.train", f"--config={TINY}", f"--workdir={workdir}", *OVERRIDES,
            f"--config.train.num_steps={steps}", "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
            "--config.train.record_example_ids=True", "--config.optim.lr=1e-3", *extra]  # fmt: skip


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sigterm_then_resume_is_exact_and_compiles_nothing_again(tmp_path):
    steps = 12
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # and conftest's XLA_FLAGS
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each run keeps its compilations in its workdir
    subprocess.run(_train_command(tmp_path / "straight", steps), check=True, env=env, capture_output=True)
    run = subprocess.Popen(_train_command(tmp_path / "stopped", steps), env=env, stderr=subprocess.PIPE)
    while not os.path.exists(tmp_path / "stopped" / "metrics.jsonl") or len(_metrics(tmp_path / "stopped")) < 3:
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0
    stopped_at = _metrics(tmp_path / "stopped")[-1]["step"]
    assert 3 <= stopped_at < steps, "the run finished before SIGTERM arrived; nothing was tested"
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == [str(stopped_at)]
    compiled = set(os.listdir(tmp_path / "stopped" / "xla_cache"))
    assert any(name.startswith("jit_train_step-") for name in compiled), compiled
    subprocess.run(_train_command(tmp_path / "stopped", steps), check=True, env=env, capture_output=True)
    # The resumed run loaded every program it needed from the workdir's cache: it compiled nothing new.
    assert set(os.listdir(tmp_path / "stopped" / "xla_cache")) == compiled
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["example_ids"] for r in resumed] == [r["example_ids"] for r in straight]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight], rtol=1e-6)


def test_params_saved_from_eight_cpu_devices_compile_nothing_and_restore_exactly(tmp_path):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    # Shapes no earlier test saved; one array sharded, the others replicated on all 8 devices.
    layout = {"w0": ((64, 48), jax.P(None, "fsdp")), "w1": ((48,), jax.P()), "w2": ((3, 3, 8, 16), jax.P()),
              "w3": ((7,), jax.P()), "w4": ((2, 5, 12), jax.P())}  # fmt: skip
    rng = np.random.default_rng(0)
    params = {
        name: jax.device_put(rng.normal(size=shape).astype(np.float32), jax.sharding.NamedSharding(mesh, spec))
        for name, (shape, spec) in layout.items()
    }
    compiles = []

    def listen(event, duration, **_):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        checkpoint.save_params(str(tmp_path / "p"), params)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    # Replica-parallel saving would compile a slice program per array shape and replica (CPU devices share one
    # memory, so it gains nothing there); the whole replicas are written as they are.
    assert compiles == []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    restored = checkpoint.load_params(str(tmp_path / "p"), abstract)
    for name, x in params.items():
        assert restored[name].sharding == x.sharding
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(x))


def test_init_from_a_params_checkpoint(tmp_path):
    config = tiny_config(steps=3)
    _, first = train(config, str(tmp_path / "a"))
    checkpoint.export_params(str(tmp_path / "a"), str(tmp_path / "params"))
    config.train.init_from = str(tmp_path / "params")
    config.train.num_steps = 1
    _, again = train(config, str(tmp_path / "b"))
    # The first step from the exported params has a lower loss than the first step from scratch.
    assert again[0]["loss"] < first[0]["loss"]
    assert os.path.exists(tmp_path / "params" / "config.json")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(steps=6, checkpoint_every=1)
    # lr 0 at the first step, then 2.5e29: the parameters' norm overflows at step 2.
    config.optim.update(lr=1e30, warmup_steps=4, clip=0.0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite param_norm at step 2; .*\(step 1\) is kept"):
        train(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    checkpoint.export_params(str(tmp_path), str(tmp_path / "params"))
    params = checkpoint.load_params(str(tmp_path / "params"), None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_missing_frozen_weights_is_a_clear_error(tmp_path):
    config = tiny_config()
    config.tokenizer.checkpoint = ""
    with pytest.raises(ValueError, match=r"set tokenizer\.checkpoint"):
        train(config, str(tmp_path))


def test_precomputed_latents_and_text_features_train_like_images(tmp_path):
    from infinity_jax.data.precompute import precompute

    config = tiny_config(steps=3)
    config.text.dtype = "float32"
    config.mesh.num_devices = 1
    index = precompute(config, str(tmp_path / "pre"), batch_size=8)
    assert index["precomputed"] and len(index["h_div_w"]) == 18 and index["skipped"] == 0
    _, from_images = train(config, str(tmp_path / "images"))
    config.data.update(source="array_record", path=str(tmp_path / "pre"), precomputed=True)
    config.tokenizer.checkpoint = config.text.checkpoint = ""  # not needed any more
    _, from_records = train(config, str(tmp_path / "records"))
    np.testing.assert_allclose(_losses(from_records), _losses(from_images), rtol=1e-5)
    config.data.update(source="jsonl", path=SET)  # images again, but no frozen towers: a clear error
    for cond in ("text", "class"):
        config.model.cond = cond
        with pytest.raises(ValueError, match=r"data\.precomputed=True but the records hold (captions|images)"):
            train(config, str(tmp_path / f"wrong_{cond}"))
