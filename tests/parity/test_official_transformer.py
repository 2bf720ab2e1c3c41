"""Parity of the transformer with the official PyTorch Infinity: same random weights (official state dict converted),
same inputs; logits of the full-sequence forward and of the KV-cached teacher-forced generation.

The official model runs in float64 (its float32 path rounds the cross-attention to bf16), ours in float32. Run with
INFINITY_OFFICIAL=/path/to/Infinity; each test prints the measured relative error.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax import quantizer, schedules
from infinity_jax.convert import transformer as convert
from infinity_jax.generate import generate
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.ops.resize import bilinear_resize

pytest.importorskip("torch")
OFFICIAL = os.environ.get("INFINITY_OFFICIAL")

LAYOUTS = {  # (our config, official block_chunks)
    "tiny": (
        TransformerConfig(depth=2, embed_dim=64, num_heads=2, ffn_dim=256, bits=8, text_dim=256, text_maxlen=16),
        2,
    ),
    "t5-width": (
        TransformerConfig(depth=3, embed_dim=256, num_heads=2, ffn_dim=1024, bits=32, text_dim=2048, text_maxlen=24),
        3,
    ),
}


@pytest.fixture(scope="module")
def harness(official):
    from tests.parity import official_infinity

    return official_infinity, official_infinity.load_official_infinity(OFFICIAL)


def _inputs(config, schedule, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((2, 7, config.text_dim)).astype(np.float32)
    mask = np.arange(7)[None] < np.array([[7], [4]])
    bits = [rng.integers(0, 2, (2, h, w, config.bits)).astype(np.int32) for h, w in schedule.scales]
    latent_sums = [
        quantizer.bits_to_latent([jnp.asarray(b) for b in bits[: k + 1]], schedule.grid) for k in range(len(bits) - 1)
    ]
    inputs = quantizer.flatten_scales([bilinear_resize(s, schedule.scales[k + 1]) for k, s in enumerate(latent_sums)])
    return text, mask, bits, np.asarray(inputs)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("template", [1.0, 0.5])
def test_logits_match_the_official_model(harness, layout, template):
    helpers, mods = harness
    config, chunks = LAYOUTS[layout]
    model = helpers.build_official_infinity(
        mods, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads, bits=config.bits,
        text_dim=config.text_dim, text_maxlen=config.text_maxlen, block_chunks=chunks, seed=1,
    )  # fmt: skip
    params = convert.convert_state_dict(model.state_dict(), config)
    schedule = schedules.infinity_schedule(template, "0.06M")
    text, mask, bits, inputs = _inputs(config, schedule)
    official_inputs = helpers.official_teacher_forced_inputs(bits, schedule.scales)
    input_err = np.abs(inputs - official_inputs).max()
    reference = helpers.official_forward_logits(model, text, mask, official_inputs, schedule.scales)
    reference = reference.reshape(*reference.shape[:2], config.bits, 2)
    ours = Infinity(config).apply(
        {"params": params}, jnp.asarray(inputs), schedule, text=jnp.asarray(text), text_mask=jnp.asarray(mask)
    )
    full_err = np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max()
    cached_reference = helpers.official_cached_logits(model, text, mask, bits, schedule.scales)
    out = generate(
        params,
        config,
        schedule,
        jax.random.key(0),
        text=text,
        text_mask=mask,
        teacher_bits=[jnp.asarray(b) for b in bits],
        return_logits=True,
    )
    cached_err = max(
        np.abs(np.asarray(o) - r.reshape(o.shape)).max() / np.abs(r).max()
        for o, r in zip(out.logits, cached_reference, strict=True)
    )
    print(
        f"\n{layout} {schedule.name}: inputs max diff {input_err:.1e}; full-sequence logits rel err {full_err:.2e}; "
        f"KV-cached logits rel err {cached_err:.2e} (max |logit| {np.abs(reference).max():.2f})"
    )
    assert input_err < 1e-5 and full_err <= 1e-3 and cached_err <= 1e-3
