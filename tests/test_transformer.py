"""The next-scale transformer: sizes, full-sequence vs KV-cached generation, guidance, sampling, sharding, errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import PartitionSpec as P

from infinity_jax import quantizer, schedules, sharding
from infinity_jax.generate import compiler_options, for_inference, generate, sample_bits
from infinity_jax.models import layers, sizes, transformer
from infinity_jax.models.bsq_vae import TokenizerConfig
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.ops import attention as attention_ops
from infinity_jax.tokenizer import Tokenizer

TINY = TransformerConfig(depth=2, embed_dim=64, num_heads=2, ffn_dim=256, bits=8, text_dim=256, text_maxlen=16)
TINY_CLASS = TransformerConfig(
    depth=2, embed_dim=64, num_heads=2, ffn_dim=256, bits=8, cond="class", num_classes=10, shared_aln=False
)
ONE_BLOCK = TransformerConfig(**{**TINY_CLASS.__dict__, "depth": 1})  # the 15-template sweep compiles 15 times
SQUARE = schedules.infinity_schedule(1.0, "0.06M")
WIDE = schedules.infinity_schedule(0.333, "0.06M")


def conditioning(config, batch=2, length=5, seed=0):
    rng = np.random.default_rng(seed)
    if config.cond == "class":
        return {"labels": jnp.arange(batch) % config.num_classes}
    lengths = [length - i for i in range(batch)]
    mask = np.arange(length)[None] < np.array(lengths)[:, None]
    return {
        "text": jnp.asarray(rng.standard_normal((batch, length, config.text_dim)), jnp.float32),
        "text_mask": jnp.asarray(mask),
    }


def assert_generations_agree(params, want_config, got_config, schedule=SQUARE):
    """Generations of the tiny text model under two layouts of one computation agree: bf16 results in another
    order may flip a bit whose two logits tie, and the scales after it see other inputs, so logits are compared
    up to the first scale whose bits differ, and > 99 % of all bits must agree."""
    run = lambda config: generate(  # noqa: E731
        params, config, schedule, jax.random.key(3), **conditioning(TINY), cfg=3.0, tau=0.7, return_logits=True
    )
    want, got = run(want_config), run(got_config)
    for a, b, bits_a, bits_b in zip(want.logits, got.logits, want.bits, got.bits, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-2, atol=2e-2)
        if np.any(np.asarray(bits_a) != np.asarray(bits_b)):
            break
    agree = np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(want.bits, got.bits, strict=True)])
    assert agree > 0.99, agree


@functools.cache
def random_params(config, seed=0):
    """Initialised, then perturbed everywhere: the released init starts gates and the head near zero, which
    would make comparisons of logits vacuous."""
    model = Infinity(config)
    cond = conditioning(config)
    inputs = jnp.zeros((2, SQUARE.num_tokens - 1, config.bits))
    params = nn.unbox(jax.jit(lambda: model.init(jax.random.key(seed), inputs, SQUARE, **cond))()["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def ground_truth(config, schedule, batch=2, seed=0):
    """Bits of a random latent and the next-scale inputs they imply (BSC without flips)."""
    z = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *schedule.grid, config.bits)), jnp.float32)
    targets = jax.jit(quantizer.self_correct, static_argnums=1)(z, schedule, [None] * schedule.num_scales)
    return quantizer.split_scales(targets.labels, schedule), targets.inputs


@functools.cache
def _forward(config, schedule):
    return jax.jit(lambda p, x, c, drop: Infinity(config).apply({"params": p}, x, schedule, drop=drop, **c))


def full_logits(config, schedule, inputs, cond, drop=None):
    return _forward(config, schedule)(random_params(config), inputs, cond, drop)


@pytest.mark.parametrize("name", [n for n, s in sizes.SIZES.items() if s.family == "infinity"])
def test_parameter_counts_equal_the_official_models(name):
    config = TransformerConfig.from_size(name, bits=56 if name == "infinity_8b" else 32)
    cond = dict(text=jnp.zeros((1, 2, config.text_dim)), text_mask=jnp.ones((1, 2), bool))
    shapes = jax.eval_shape(
        lambda: Infinity(config).init(
            jax.random.key(0), jnp.zeros((1, 0, config.bits)), schedules.Schedule(((1, 1),)), **cond
        )
    )
    count = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))
    assert count == sizes.count_params(sizes.SIZES[name], bits=config.bits)
    expected = {"infinity_2b": 2_204_564_032, "infinity_layer12": 125_185_696, "infinity_layer24": 940_944_832}
    assert count == expected.get(name, count)


@pytest.mark.parametrize("config,schedule", [(TINY, SQUARE), (TINY, WIDE), (TINY_CLASS, WIDE)])
def test_teacher_forced_generation_equals_the_full_sequence_forward(config, schedule):
    bits, inputs = ground_truth(config, schedule)
    cond = conditioning(config)
    full = full_logits(config, schedule, inputs, cond)
    out = generate(
        random_params(config), config, schedule, jax.random.key(0), **cond, teacher_bits=bits, return_logits=True
    )
    for k in range(schedule.num_scales):
        start, end = schedule.offsets[k], schedule.offsets[k + 1]
        np.testing.assert_allclose(
            np.asarray(out.logits[k]), np.asarray(full[:, start:end]), atol=1e-4, err_msg=f"scale {k}"
        )
    assert float(jnp.abs(full).max()) > 0.1  # the comparison is not between near-zero numbers
    for ours, theirs in zip(out.bits, bits, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_scanned_rematerialised_blocks_equal_the_loop():
    from infinity_jax.convert.transformer import stack_blocks, unstack_blocks

    scanned = TransformerConfig(**{**TINY.__dict__, "scan_blocks": True, "remat": "nothing_saveable"})
    _, inputs = ground_truth(TINY, SQUARE)
    cond = conditioning(TINY)
    params = stack_blocks(random_params(TINY), TINY.depth)
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(params, TINY.depth), random_params(TINY))
    ours = jax.jit(lambda p: Infinity(scanned).apply({"params": p}, inputs, SQUARE, **cond))(params)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full_logits(TINY, SQUARE, inputs, cond)), atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(Infinity(scanned).apply({"params": p}, inputs, SQUARE, **cond) ** 2)))(
        params
    )
    assert grads["blocks"]["layers"]["sa"]["qkv"]["kernel"].shape == (2, 64, 3, 2, 32)
    # Generation through the scanned stack (KV cache of all layers in the scan carry) gives the same logits.
    bits, _ = ground_truth(TINY, SQUARE)
    run = functools.partial(
        generate, schedule=SQUARE, key=jax.random.key(0), **cond, cfg=2.0, teacher_bits=bits, return_logits=True
    )
    looped, stacked = run(random_params(TINY), TINY), run(params, scanned)
    np.testing.assert_allclose(np.asarray(stacked.logits[-1]), np.asarray(looped.logits[-1]), atol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # The loop keeps one cache per layer, its length rounded up to cuDNN's tile; the scan one stacked buffer.
    per_layer, stacked_cache = transformer.init_cache(TINY, 2, SQUARE), transformer.init_cache(scanned, 2, SQUARE)
    assert len(per_layer) == TINY.depth and per_layer[0][0].shape == (2, 576, TINY.num_heads, TINY.head_dim)
    assert stacked_cache[0].shape == (TINY.depth, 2, SQUARE.num_tokens, TINY.num_heads, TINY.head_dim)


def test_remat_policies_give_the_same_gradients_and_keep_what_they_name(capsys):
    _, inputs = ground_truth(TINY, SQUARE)
    cond, params = conditioning(TINY), random_params(TINY)

    def loss_of(policy, free=0):
        model = Infinity(dataclasses.replace(TINY, remat=policy, remat_free=free))
        return lambda p: jnp.sum(model.apply({"params": p}, inputs, SQUARE, **cond) ** 2)

    reference = jax.jit(jax.grad(loss_of("none")))(params)
    for policy, free in [(p, 0) for p in transformer.REMAT_POLICIES[1:]] + [("nothing_saveable", 1)]:
        grads = jax.jit(jax.grad(loss_of(policy, free)))(params)
        # float32 sums in another order: each leaf's error is measured against its largest entry.
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))

    def saved_gelu(policy):
        capsys.readouterr()
        print_saved_residuals(loss_of(*policy) if isinstance(policy, tuple) else loss_of(policy), params)
        return [line.split()[0] for line in capsys.readouterr().out.splitlines() if repr(layers.GELU_NAME) in line]

    # Each block's [B, L, ffn_dim] GELU output is kept by the policy that names it, and only by that one.
    assert saved_gelu("dots_and_gelu_saveable") == [f"f32[2,{SQUARE.num_tokens},{TINY.ffn_dim}]"] * TINY.depth
    assert saved_gelu("dots_saveable") == []
    # A block left out of the remat keeps everything, its GELU output included.
    assert saved_gelu("nothing_saveable") == [] and len(saved_gelu(("nothing_saveable", 1))) == 1
    with pytest.raises(ValueError, match="remat_free=1 needs unrolled blocks"):
        dataclasses.replace(TINY, scan_blocks=True, remat="dots_saveable", remat_free=1)


def test_unrolled_init_is_the_scanned_twins_layers_cut_apart():
    from infinity_jax.convert.transformer import unstack_blocks

    cond, key = conditioning(TINY), jax.random.key(3)
    inputs = jnp.zeros((2, SQUARE.num_tokens - 1, TINY.bits))
    unrolled = transformer.init_params(TINY, key, inputs, SQUARE, **cond)
    own = jax.eval_shape(lambda: Infinity(TINY).init(key, inputs, SQUARE, **cond)["params"])
    # The unrolled module's own layout: the same tree, shapes and logical axis names (so the same shardings).
    boxed = functools.partial(jax.tree_util.tree_leaves_with_path, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert [(p, x.value.shape, x.names) for p, x in boxed(own)] == [
        (p, x.value.shape, x.names) for p, x in boxed(unrolled)
    ]
    scanned = transformer.init_params(dataclasses.replace(TINY, scan_blocks=True), key, inputs, SQUARE, **cond)
    params = nn.unbox(unrolled)
    for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(unstack_blocks(nn.unbox(scanned), TINY.depth)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    blocks = params["blocks"]
    assert not np.allclose(blocks["block_0"]["ffn"]["fc1"]["kernel"], blocks["block_1"]["ffn"]["fc1"]["kernel"])
    logits = Infinity(TINY).apply({"params": params}, inputs, SQUARE, **cond)
    assert logits.shape == (2, SQUARE.num_tokens, TINY.bits, 2) and bool(jnp.isfinite(logits).all())


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_generation_reads_each_layer_cache_whole():
    """With unrolled blocks, cuDNN attends over a layer's whole cache bounded by key lengths, where XLA's kernel
    takes the prefix: the logits must agree up to bf16 rounding."""
    config = dataclasses.replace(TINY, dtype="bfloat16")
    params, config = for_inference(random_params(TINY), config)
    bits, _ = ground_truth(TINY, SQUARE)
    run = functools.partial(
        generate, params, schedule=SQUARE, key=jax.random.key(0), **conditioning(TINY), cfg=2.0,
        teacher_bits=bits, return_logits=True,
    )  # fmt: skip
    xla, cudnn = run(config), run(dataclasses.replace(config, attention="cudnn"))
    for a, b in zip(xla.logits, cudnn.logits, strict=True):
        np.testing.assert_allclose(np.float32(b), np.float32(a), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kernel",
    [
        "xla",
        pytest.param(
            "cudnn",
            marks=pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="cuDNN needs an NVIDIA GPU"),
        ),
    ],
)
def test_generation_never_reads_a_cache_row_before_writing_it(kernel):
    """Generation may start from an uninitialized KV cache (`init_cache(uninitialized=True)`): with unwritten rows
    full of NaN, every scale's hidden states must equal those over a zeroed cache. XLA's kernel reads the written
    prefix; cuDNN reads whole key tiles, so each scale writes zeros up to its last tile's end."""
    config = dataclasses.replace(TINY, dtype="bfloat16", attention=kernel)
    params, config = for_inference(random_params(TINY), config)
    model, cond = Infinity(config), conditioning(TINY)

    @jax.jit
    def scales(params, cache):
        apply = lambda *a, method: model.apply({"params": params}, *a, method=method)  # noqa: E731
        condition = apply(cond["text"], cond["text_mask"], None, None, method=Infinity.condition)
        x, hidden = apply(condition.cond, method=Infinity.sos), []
        for k, n in enumerate(SQUARE.tokens_per_scale):
            if k:
                features = jax.random.normal(jax.random.key(k), (2, n, config.bits))
                x = apply(features, method=Infinity.embed)
            out, cache = apply(x, condition, SQUARE, k, cache, method=Infinity.step)
            hidden.append(out)
        return hidden

    zeros = transformer.init_cache(config, 2, SQUARE)
    garbage = jax.tree.map(lambda c: jnp.full_like(c, jnp.nan), zeros)
    for k, (a, b) in enumerate(zip(scales(params, zeros), scales(params, garbage), strict=True)):
        assert bool(jnp.isfinite(a).all()), k
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"scale {k}")


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_cudnn_training_gradients_match_xla(remat, capsys):
    """Training with cuDNN: block-causal attention by key prefix (short prefixes copied and padded, long ones read
    in place bounded by key lengths) and cross-attention over padded captions. Logits and gradients must agree
    with XLA's attention (no remat) up to bf16 rounding; under a dots policy the backward reuses every cuDNN
    attention's output and softmax statistics instead of running the kernel again."""
    config = dataclasses.replace(TINY, dtype="bfloat16")
    _, inputs = ground_truth(TINY, SQUARE)
    cond, params = conditioning(TINY), random_params(TINY)

    def loss_of(attention, policy):
        model = Infinity(dataclasses.replace(config, attention=attention, remat=policy))
        return lambda p: jnp.sum(model.apply({"params": p}, inputs, SQUARE, **cond).astype(jnp.float32) ** 2)

    (xla_loss, xla_grads) = jax.jit(jax.value_and_grad(loss_of("xla", "none")))(params)
    (cudnn_loss, cudnn_grads) = jax.jit(jax.value_and_grad(loss_of("cudnn", remat)))(params)
    np.testing.assert_allclose(float(cudnn_loss), float(xla_loss), rtol=2e-2)
    pairs = zip(jax.tree_util.tree_leaves_with_path(xla_grads), jax.tree.leaves(cudnn_grads), strict=True)
    for (path, a), b in pairs:
        bound = 5e-2 * float(jnp.abs(a).max()) + 1e-6
        np.testing.assert_allclose(np.float32(b), np.float32(a), atol=bound, err_msg=jax.tree_util.keystr(path))
    if remat != "none":
        capsys.readouterr()
        print_saved_residuals(loss_of("cudnn", remat), params)
        saved = [line for line in capsys.readouterr().out.splitlines() if "dot_product_attention_fwd" in line]
        # Per block: one self-attention call per scale group and one cross-attention call, two outputs each.
        calls = len(attention_ops.scale_groups(SQUARE)) + 1
        assert len(saved) == 2 * calls * TINY.depth, saved


def test_inference_layout_casts_only_the_blocks():
    from infinity_jax.convert.transformer import stack_blocks

    params = random_params(TINY)
    same, config = for_inference(params, TINY)
    assert same is params and config == TINY  # float32: nothing to change
    scanned = dataclasses.replace(TINY, dtype="bfloat16", scan_blocks=True, remat="nothing_saveable")
    cast, bf16 = for_inference(stack_blocks(params, TINY.depth), scanned)
    assert (bf16.scan_blocks, bf16.remat, bf16.dtype) == (True, "none", "bfloat16")
    assert bf16.layer_weights == "slice"  # the in-place kernel is for one Hopper GPU, not this CPU
    for path, leaf in jax.tree_util.tree_leaves_with_path(cast):
        in_blocks = path[0].key == "blocks"
        assert leaf.dtype == (jnp.bfloat16 if in_blocks else jnp.float32), jax.tree_util.keystr(path)
    # The blocks' matmuls ran in bf16 before as well: casting once changes only the float32 leaves of the blocks
    # (norms, AdaLN table, biases), so the logits stay within bf16 rounding of the float32 model's.
    bits, _ = ground_truth(TINY, SQUARE)
    cond = conditioning(TINY)
    run = functools.partial(
        generate, schedule=SQUARE, key=jax.random.key(0), **cond, teacher_bits=bits, return_logits=True
    )
    exact, fast = run(params, TINY).logits[-1], run(cast, bf16).logits[-1]
    error = float(jnp.linalg.norm(fast - exact) / jnp.linalg.norm(exact))
    assert 0 < error < 3e-2, error


def test_target_labels_are_bitwise_self_correction_with_the_models_own_errors():
    z = jnp.asarray(np.random.default_rng(3).standard_normal((2, *SQUARE.grid, TINY.bits)), jnp.float32)
    cond = conditioning(TINY)
    plain = jax.jit(quantizer.self_correct, static_argnums=1)(z, SQUARE, [None] * SQUARE.num_scales).labels
    teacher = quantizer.split_scales(plain, SQUARE)
    forced = generate(random_params(TINY), TINY, SQUARE, jax.random.key(0), **cond, teacher_bits=teacher,
                      target_latent=z)  # fmt: skip
    for ours, theirs in zip(forced.labels, teacher, strict=True):  # no errors: the plain labels
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    free = generate(random_params(TINY), TINY, SQUARE, jax.random.key(1), **cond, target_latent=z)
    # The model's own samples are BSC flips: labels after them are self_correct's with flips = sample XOR label.
    flips = [b ^ label for b, label in zip(free.bits, free.labels, strict=True)]
    expected = jax.jit(quantizer.self_correct, static_argnums=1)(z, SQUARE, flips).labels
    np.testing.assert_array_equal(np.asarray(quantizer.flatten_scales(free.labels)), np.asarray(expected))
    assert int(sum(jnp.sum(f) for f in flips)) > 0  # the model did err, so the check is not the plain case
    with pytest.raises(ValueError, match="target_latent must be"):
        generate(random_params(TINY), TINY, SQUARE, jax.random.key(1), **cond, target_latent=z[:, :4])


def test_guidance_on_logits_with_per_scale_cfg_and_tau_and_negative_prompts():
    bits, inputs = ground_truth(TINY, SQUARE)
    cond = conditioning(TINY)
    params = random_params(TINY)
    cfg = np.linspace(1.5, 4.0, SQUARE.num_scales)
    tau = np.linspace(0.5, 1.0, SQUARE.num_scales)
    conditional = full_logits(TINY, SQUARE, inputs, cond)
    unconditional = full_logits(TINY, SQUARE, inputs, cond, drop=jnp.ones(2, bool))  # the learned empty caption
    negative = conditioning(TINY, length=3, seed=7)
    negative_logits = full_logits(TINY, SQUARE, inputs, {"text": negative["text"], "text_mask": negative["text_mask"]})
    for uncond, extra in (
        (unconditional, {}),
        (negative_logits, {"negative_text": negative["text"], "negative_mask": negative["text_mask"]}),
    ):
        out = generate(
            params,
            TINY,
            SQUARE,
            jax.random.key(0),
            **cond,
            **extra,
            cfg=cfg,
            tau=tau,
            teacher_bits=bits,
            return_logits=True,
        )
        for k in range(SQUARE.num_scales):
            s = slice(SQUARE.offsets[k], SQUARE.offsets[k + 1])
            expected = (cfg[k] * conditional[:, s] + (1 - cfg[k]) * uncond[:, s]) / tau[k]
            np.testing.assert_allclose(np.asarray(out.logits[k]), np.asarray(expected), atol=2e-4, rtol=1e-4)
    # Guidance on hidden states after a block changes the result; with cfg = 1 everywhere nothing is guided.
    hidden = generate(
        params, TINY, SQUARE, jax.random.key(0), **cond, cfg=3.0, cfg_layer=-1, teacher_bits=bits, return_logits=True
    )
    on_logits = generate(
        params, TINY, SQUARE, jax.random.key(0), **cond, cfg=3.0, teacher_bits=bits, return_logits=True
    )
    assert float(jnp.abs(hidden.logits[-1] - on_logits.logits[-1]).max()) > 1e-3
    plain = generate(
        params, TINY, SQUARE, jax.random.key(0), **cond, cfg=1.0, cfg_layer=-1, teacher_bits=bits, return_logits=True
    )
    np.testing.assert_allclose(
        np.asarray(plain.logits[-1]), np.asarray(conditional[:, SQUARE.offsets[-2] :]), atol=1e-4
    )


@pytest.mark.parametrize("template", schedules.H_DIV_W_TEMPLATES)
def test_sampling_runs_for_every_template(template):
    schedule = schedules.infinity_schedule(template, "0.06M")
    out = generate(random_params(ONE_BLOCK), ONE_BLOCK, schedule, jax.random.key(0), labels=[3], cfg=2.0, top_p=0.97)
    assert [b.shape for b in out.bits] == [(1, h, w, 8) for h, w in schedule.scales]
    assert out.latent.shape == (1, *schedule.grid, 8) and out.images is None
    assert all(set(np.unique(np.asarray(b))) <= {0, 1} for b in out.bits)


def test_sampling_keys_and_greedy_top_p():
    params, cond = random_params(TINY), conditioning(TINY)
    runs = [
        generate(params, TINY, WIDE, jax.random.key(k), **cond, cfg=3.0, tau=1.0, return_logits=True) for k in (0, 0, 1)
    ]
    same = all(bool((a == b).all()) for a, b in zip(runs[0].bits, runs[1].bits, strict=True))
    different = any(bool((a != b).any()) for a, b in zip(runs[0].bits, runs[2].bits, strict=True))
    assert same and different
    greedy = [
        generate(params, TINY, WIDE, jax.random.key(k), **cond, cfg=3.0, top_p=1e-6, return_logits=True) for k in (0, 1)
    ]
    for k in range(WIDE.num_scales):
        np.testing.assert_array_equal(np.asarray(greedy[0].bits[k]), np.asarray(greedy[1].bits[k]))
        argmax = (greedy[0].logits[k][..., 1] > greedy[0].logits[k][..., 0]).astype(jnp.int32)
        np.testing.assert_array_equal(np.asarray(greedy[0].bits[k]).reshape(argmax.shape), np.asarray(argmax))


def test_two_way_top_k_top_p_semantics():
    logits = jnp.log(jnp.array([[0.02, 0.98], [0.6, 0.4], [0.5, 0.5]]))
    uniform = jnp.array([0.99, 0.5, 0.3])  # bit = 1 where uniform < P(1)
    assert sample_bits(uniform, logits).tolist() == [0, 0, 1]
    assert sample_bits(uniform, logits, top_p=0.97).tolist() == [1, 0, 1]  # 0.02 <= 0.03 is removed, 0.4 is not
    assert sample_bits(uniform, logits, top_k=1).tolist() == [1, 0, 1]  # greedy; a tie keeps the second value
    assert sample_bits(uniform, logits, top_k=900).tolist() == [0, 0, 1]  # no effect on two classes


def test_generation_decodes_with_a_patchified_tokenizer():
    tokenizer = Tokenizer.init(
        TokenizerConfig(bits=2, stride=8, base_ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, patchify=True),
        jax.random.key(0),
    )
    config = TransformerConfig(**{**TINY_CLASS.__dict__, "bits": 8})
    schedule = schedules.Schedule(((1, 1), (2, 2), (4, 4)), name="64px")
    out = generate(
        random_params(config),
        config,
        schedule,
        jax.random.key(0),
        labels=[1, 2],
        cfg=3.0,
        top_p=0.97,
        tokenizer=tokenizer,
    )
    assert out.images.shape == (2, 64, 64, 3) and out.latent.shape == (2, 8, 8, 2)
    np.testing.assert_allclose(np.asarray(tokenizer.decode_bits(out.bits, schedule)), np.asarray(out.images), atol=1e-5)


def test_bf16_generation_decodes_in_bf16_as_the_official_sampler():
    tokenizer = Tokenizer.init(
        TokenizerConfig(bits=8, stride=16, base_ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1), jax.random.key(0)
    )
    schedule = schedules.Schedule(((1, 1), (2, 2), (4, 4)), name="64px")

    def conv_dtypes(precision):
        """The input dtypes of the convolutions in the compiled generation (`_generate`, as `generate` jits it)."""
        from infinity_jax.generate import Static, _generate

        params, config = for_inference(random_params(TINY_CLASS), dataclasses.replace(TINY_CLASS, dtype=precision))
        static = Static(config, schedule, batch=2, guided=False, known=False, return_logits=False)
        ones = jnp.ones(schedule.num_scales)
        no = None
        args = (params, jax.random.key(0), no, no, jnp.array([1, 2]), no, no, ones, ones, 0, 0.0, no, tokenizer, no)
        jaxpr = jax.make_jaxpr(functools.partial(_generate, static=static))(*args).jaxpr
        return {str(e.invars[0].aval.dtype) for e in _equations(jaxpr) if e.primitive.name == "conv_general_dilated"}

    assert conv_dtypes("bfloat16") == {"bfloat16"}  # the tokenizer itself is float32
    assert conv_dtypes("float32") == {"float32"}


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_fsdp_sharded_forward_equals_single_device():
    mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices("cpu"))
    _, inputs = ground_truth(TINY, SQUARE, batch=8)
    cond = conditioning(TINY, batch=8, length=9)
    model = Infinity(TINY)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, SQUARE, **cond))["params"]
    shardings = sharding.logical_shardings(abstract, mesh, sharding.TRANSFORMER_RULES)
    assert shardings["blocks"]["block_0"]["ffn"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    params = jax.device_put(random_params(TINY), shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.TRANSFORMER_RULES):
        logits = jax.jit(lambda p: model.apply({"params": p}, inputs, SQUARE, **cond))(params)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits(TINY, SQUARE, inputs, cond)), atol=1e-5)


def test_bad_input_raises_clear_errors():
    params, cond = random_params(TINY), conditioning(TINY)
    with pytest.raises(ValueError, match="prompt of 17 tokens is longer than the model's text_maxlen 16"):
        generate(
            params, TINY, SQUARE, jax.random.key(0), text=jnp.zeros((1, 17, 256)), text_mask=jnp.ones((1, 17), bool)
        )
    with pytest.raises(ValueError, match="must start with a 1x1 scale"):
        generate(params, TINY, schedules.Schedule(((2, 2), (4, 4))), jax.random.key(0), **cond)
    few_levels = TransformerConfig(**{**TINY.__dict__, "num_levels": 4})
    with pytest.raises(ValueError, match="has 7 scales but the model has 4 level embeddings"):
        generate(params, few_levels, SQUARE, jax.random.key(0), **cond)
    with pytest.raises(ValueError, match="cfg must be a number or a list of 7 values"):
        generate(params, TINY, SQUARE, jax.random.key(0), **cond, cfg=[3.0, 3.0])
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 10\), got 3..10"):
        generate(random_params(TINY_CLASS), TINY_CLASS, SQUARE, jax.random.key(0), labels=[3, 10])
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, TINY, SQUARE, jax.random.key(0), text=cond["text"], text_mask=jnp.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="padding after them"):
        generate(
            params, TINY, SQUARE, jax.random.key(0), text=cond["text"], text_mask=jnp.array([[0, 1, 1, 1, 1]] * 2, bool)
        )
    with pytest.raises(ValueError, match=r"text features must be \[B, T, 256\]"):
        generate(params, TINY, SQUARE, jax.random.key(0), text=jnp.zeros((2, 5, 128)), text_mask=cond["text_mask"])
    with pytest.raises(ValueError, match="needs labels"):
        generate(random_params(TINY_CLASS), TINY_CLASS, SQUARE, jax.random.key(0))
    with pytest.raises(ValueError, match="cfg_layer must be 0"):
        generate(params, TINY, SQUARE, jax.random.key(0), **cond, cfg=2.0, cfg_layer=-2)
    with pytest.raises(ValueError, match=r"scale 1: known bits must be \(2, 2, 2, 8\)"):
        generate(
            params,
            TINY,
            SQUARE,
            jax.random.key(0),
            **cond,
            teacher_bits=[jnp.zeros((2, 1, 1, 8)), jnp.zeros((2, 1, 1, 8))],
        )
    with pytest.raises(ValueError, match=r"inputs must be \[B, 520, 8\]"):
        Infinity(TINY).apply({"params": params}, jnp.zeros((2, 100, 8)), SQUARE, **cond)
    with pytest.raises(ValueError, match="text_dim 200 must be a multiple of 128"):
        TransformerConfig(depth=1, embed_dim=64, num_heads=2, ffn_dim=256, text_dim=200)


def test_generation_compiles_with_the_options_of_its_platform_or_the_given_ones():
    params, cond = random_params(TINY), conditioning(TINY)
    assert compiler_options("cpu") == {}  # XLA's defaults
    assert compiler_options("cuda") == {"xla_gpu_enable_triton_gemm": False}
    # The given options reach XLA: a name it does not know fails the compile, naming it.
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_no_such_option'"):
        generate(params, TINY, SQUARE, jax.random.key(0), **cond, xla_options={"xla_no_such_option": True})
    with pytest.raises(ValueError, match="runs Triton kernels, for GPUs; the parameters are on cpu"):
        generate(params, dataclasses.replace(TINY, generation_kernels="pallas"), SQUARE, jax.random.key(0), **cond)


def test_initialisation_follows_the_released_recipe():
    config = TransformerConfig(depth=4, embed_dim=256, num_heads=2, ffn_dim=1024, bits=8, text_dim=256, text_maxlen=16)
    cond = conditioning(config)
    params = nn.unbox(jax.jit(lambda: Infinity(config).init(jax.random.key(0), jnp.zeros((2, 0, 8)), schedules.Schedule(((1, 1),)), **cond))()["params"])  # fmt: skip
    tini = (1 / (3 * 256)) ** 0.5
    block = params["blocks"]["block_2"]

    def std(x):
        return float(jnp.std(x))

    assert abs(std(block["ffn"]["fc1"]["kernel"]) / tini - 1) < 0.05
    assert abs(std(block["ffn"]["fc2"]["kernel"]) / (tini / (2 * 4) ** 0.5) - 1) < 0.05  # ×1/√(2·depth)
    assert (
        abs(std(params["head"]["kernel"]) / (tini * 0.02) - 1) < 0.1
        and float(jnp.abs(params["head"]["bias"]).max()) == 0
    )
    gss = block["ada_gss"]
    assert abs(std(gss[:2]) / (256**-0.5 * 5e-6) - 1) < 0.15 and abs(std(gss[2:]) / (256**-0.5 * 1e-3) - 1) < 0.1
    np.testing.assert_allclose(np.asarray(block["sa"]["scale_mul"]), np.log(4.0), rtol=1e-6)
    assert abs(std(params["cfg_uncond"]) * 256**0.5 - 1.2 * 0.79) < 0.1  # N(0, 1.2²) truncated at ±2, /√Ct5


def test_stochastic_depth_in_training_only():
    config = TransformerConfig(**{**TINY.__dict__, "drop_path": 0.5})
    _, inputs = ground_truth(TINY, SQUARE)
    cond = conditioning(TINY)

    def run(deterministic, seed=0):
        return Infinity(config).apply(
            {"params": random_params(TINY)}, inputs, SQUARE, **cond, deterministic=deterministic, rngs={"dropout": jax.random.key(seed)}
        )  # fmt: skip

    np.testing.assert_allclose(np.asarray(run(True)), np.asarray(full_logits(TINY, SQUARE, inputs, cond)), atol=1e-5)
    assert float(jnp.abs(run(False, 0) - run(False, 1)).max()) > 1e-3


@pytest.mark.parametrize("kernel", ["splash", "prefix"])
@pytest.mark.parametrize("h_div_w, resolution", [(1.0, "0.016M"), (0.5, "0.016M")])
def test_block_causal_kernels_equal_dense_masked_attention(kernel, h_div_w, resolution):
    """The training attention against one call with the dense [L, L] mask, values and gradients, on a square and
    a non-square schedule: the TPU splash kernel (interpreted on CPU; lengths 121 and 81 padded to its 128-token
    blocks) and the GPU/XLA path, one masked call for the small scales and an unmasked call over its key prefix
    for each scale of >= 64 tokens."""
    from infinity_jax.ops.attention import attention, block_causal_mask, prefix_attention, scale_groups
    from infinity_jax.ops.splash import block_causal_attention, padded_block_causal_mask

    schedule = schedules.infinity_schedule(h_div_w, resolution)
    length = schedule.num_tokens
    assert padded_block_causal_mask(schedule, 128).shape == (128, 128) and length % 128
    assert scale_groups(schedule) == {1.0: ((0, 4), (4, 5)), 0.5: ((0, 5),)}[h_div_w]
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (2, length, 2, 32)) for key in keys)
    mask = jnp.asarray(block_causal_mask(schedule))[None, None]

    def dense(q, k, v):
        return attention(q, k, v, scale=0.3, mask=mask)

    def fused(q, k, v):
        if kernel == "splash":
            return block_causal_attention(q, k, v, schedule, scale=0.3, interpret=True)
        return prefix_attention(q, k, v, schedule, scale=0.3, implementation="xla")

    np.testing.assert_allclose(fused(q, k, v), dense(q, k, v), atol=1e-5)
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2))(q, k, v) for f in (dense, fused)]
    for expected, got in zip(*grads, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_splash_attention_in_the_model_under_a_mesh():
    """The model with attention="splash_interpret" under a (data, fsdp, tensor) mesh (shard_map over batch and
    heads) gives the dense model's logits."""
    schedule = schedules.infinity_schedule(1.0, "0.004M")
    dense_config = TransformerConfig.from_size("tiny", bits=16, text_dim=256)
    inputs = jax.random.normal(jax.random.key(1), (4, schedule.num_tokens - 1, 16))
    text = jax.random.normal(jax.random.key(2), (4, 6, 256))
    text_mask = jnp.arange(6)[None] < jnp.asarray([6, 3, 1, 4])[:, None]
    params = Infinity(dense_config).init(jax.random.key(0), inputs, schedule, text, text_mask)["params"]
    expected = Infinity(dense_config).apply({"params": params}, inputs, schedule, text, text_mask)
    splash_model = Infinity(dataclasses.replace(dense_config, attention="splash_interpret"))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices("cpu"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.TRANSFORMER_RULES):
        got = jax.jit(lambda p: splash_model.apply({"params": p}, inputs, schedule, text, text_mask))(params)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cudnn_padding_leaves_masked_and_variable_length_attention_unchanged():
    """cuDNN takes masked or variable-length attention only at lengths in multiples of its tile: the padding that
    makes them fit (run here through XLA) must not change any real query's output."""
    from infinity_jax.ops import attention as attn

    schedule = schedules.infinity_schedule(1.0, "0.004M")  # 21 tokens
    q, k, v = (jax.random.normal(jax.random.key(i), (2, schedule.num_tokens, 2, 16)) for i in range(3))
    mask = jnp.asarray(attn.block_causal_mask(schedule))[None, None]
    padded = attn._pad(q, k, v, mask, 64)
    assert padded[0].shape[1] == padded[3].shape[-1] == 64
    out = jax.nn.dot_product_attention(*padded[:3], mask=padded[3], scale=0.25)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out[:, :21], attn.attention(q, k, v, scale=0.25, mask=mask), atol=1e-6)
    text = jax.random.normal(jax.random.key(5), (2, 30, 2, 16))
    lengths = jnp.array([30, 7], jnp.int32)
    qp, kp, vp, none = attn._pad(q, text, text, None, 64)
    assert none is None and kp.shape[1] == 64
    out = jax.nn.dot_product_attention(qp, kp, vp, scale=0.25, key_value_seq_lengths=lengths)[:, :21]
    np.testing.assert_allclose(out, attn.attention(q, text, text, scale=0.25, kv_lengths=lengths), atol=1e-6)


def test_caption_keys_values_padded_once_for_cudnn_leave_cross_attention_unchanged():
    """With cuDNN, generation pads the caption's keys/values to cuDNN's tile once (`MemoryKV`); the caption
    lengths must mask the padding, so each block's cross-attention (run here through XLA) gives what it gives on
    the unpadded keys/values."""
    params, cond = random_params(TINY), conditioning(TINY)
    condition = Infinity(TINY).apply({"params": params}, **cond, method=Infinity.condition)
    np.testing.assert_array_equal(condition.memory_lengths, [5, 4])
    cudnn = dataclasses.replace(TINY, attention="cudnn")
    plain, padded = (
        transformer.MemoryKV(c).apply({"params": params["blocks"]}, condition.memory) for c in (TINY, cudnn)
    )
    assert plain.shape[2] == 5 and padded.shape[2] == 64
    np.testing.assert_array_equal(padded[:, :, :5], plain)
    assert not bool(jnp.any(padded[:, :, 5:]))
    x = jax.random.normal(jax.random.key(3), (2, 4, TINY.embed_dim))
    for i in range(TINY.depth):
        ca = layers.CrossAttention(**transformer._heads(TINY))
        variables = {"params": params["blocks"][f"block_{i}"]["ca"]}
        outs = [ca.apply(variables, x, condition.memory, condition.memory_lengths, kv[i]) for kv in (plain, padded)]
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
        assert float(jnp.abs(outs[0]).max()) > 1e-3  # not a comparison of zeros


@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
def test_hand_written_norm_and_gate_gradients_equal_autodiff(shared):
    """AdaLN / affine LayerNorm and the gated residual have written-out backward passes (their parameter
    gradients are products with ones); values and every gradient must equal autodiff of the plain formulas."""
    rng = np.random.default_rng(0)
    b, n, c = 3, 17, 32
    x = jnp.asarray(rng.standard_normal((b, n, c)) * 3 + 1, jnp.float32)
    mul, add = (jnp.asarray(rng.standard_normal((c,) if shared else (b, 1, c)), jnp.float32) for _ in range(2))
    branch = jnp.asarray(rng.standard_normal((b, n, c)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal((b, n, c)), jnp.float32)

    def plain_norm(x, mul, add):
        mean = jnp.mean(x, -1, keepdims=True)
        return (x - mean) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + layers.LN_EPS) * mul + add

    def plain_gate(x, branch, gate):
        return x + branch.astype(jnp.float32) * gate

    cases = [(layers.normalize_affine, plain_norm, (x, mul, add)), (layers.bias_add, jnp.add, (x, add))]
    if not shared:
        cases.append((layers.gated_residual, plain_gate, (x, branch, mul)))
    for written, plain, args in cases:
        out, vjp = jax.vjp(jax.jit(written), *args)
        expected, expected_vjp = jax.vjp(plain, *args)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(vjp(cotangent), expected_vjp(cotangent), strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="one shape"):
        jax.grad(lambda m: layers.normalize_affine(x, m, add[..., :1]).sum())(mul)
    with pytest.raises(ValueError, match="one shape"):
        layers.normalize_affine(x, mul, add[..., :1])
