"""Parity of VAR with the official PyTorch code: the VQ-VAE (indices, reconstructions, teacher-forcing inputs),
the transformer's teacher-forced logits, the whole greedy generation, and our export loading into the official
models with strict=True. Same random weights (official state dicts converted), official in float64, ours in
float32. Run with VAR_OFFICIAL=/path/to/VAR; each test prints the measured errors.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinity_jax import schedules
from infinity_jax.convert import transformer as convert_transformer
from infinity_jax.convert import vqvae as convert_vqvae
from infinity_jax.generate_var import generate_var
from infinity_jax.models.transformer import Infinity, TransformerConfig
from infinity_jax.models.vqvae import VQVAES, VQTokenizer, VQVAEConfig

torch = pytest.importorskip("torch")
OFFICIAL = os.environ.get("VAR_OFFICIAL")
SCHEDULE = schedules.var_schedule(256)
PATCH_NUMS = tuple(h for h, _ in SCHEDULE.scales)


@pytest.fixture(scope="module")
def harness():
    if not OFFICIAL:
        pytest.skip("set VAR_OFFICIAL to a checkout of github.com/FoundationVision/VAR")
    from tests.parity import official_var

    return official_var, official_var.load(OFFICIAL)


def _state(module):
    return {k: v.float().numpy() for k, v in module.state_dict().items()}


def _rel(ours, ref):
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def _built(harness, vq: VQVAEConfig, shared_aln: bool, depth=2, embed_dim=128, num_heads=2):
    official_var, mods = harness
    vae, var = official_var.build(
        mods, vocab=vq.vocab, dim=vq.dim, ch=vq.layout.base_ch, patch_nums=PATCH_NUMS, depth=depth,
        embed_dim=embed_dim, num_heads=num_heads, shared_aln=shared_aln, seed=0,
    )  # fmt: skip
    config = TransformerConfig(
        depth=depth, embed_dim=embed_dim, num_heads=num_heads, ffn_dim=4 * embed_dim, bits=vq.dim, cond="class",
        shared_aln=shared_aln, positions="absolute", num_positions=SCHEDULE.num_tokens,
        num_levels=SCHEDULE.num_scales, vocab=vq.vocab,
    )  # fmt: skip
    tokenizer = VQTokenizer(convert_vqvae.convert_state_dict(_state(vae), vq), vq)
    return vae, var, config, convert_transformer.convert_state_dict(_state(var), config), tokenizer


def test_released_vqvae_matches_official(harness):
    """vae_ch160v4096z32's layout at 256²: latent, all 10 scales' indices, reconstruction, transformer inputs."""
    official_var, _ = harness
    vq = VQVAES["vae_ch160v4096z32"]
    vae, _, _, _, tokenizer = _built(harness, vq, shared_aln=False)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    with official_var.running(torch.float64):
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).double()
        f_ref = vae.quant_conv(vae.encoder(xt)).permute(0, 2, 3, 1).numpy()
        idx_ref = vae.img_to_idxBl(xt)
        rec_ref = vae.img_to_reconstructed_img(xt, last_one=True).permute(0, 2, 3, 1).numpy()
        inputs_ref = vae.quantize.idxBl_to_var_input(idx_ref).numpy()
    f = jax.jit(VQTokenizer.encode)(tokenizer, x)
    indices = jax.jit(VQTokenizer.tokenize, static_argnums=2)(tokenizer, x, SCHEDULE)
    rec = jax.jit(VQTokenizer.reconstruct, static_argnums=2)(tokenizer, x, SCHEDULE)
    official = [i.numpy().reshape(2, *grid) for i, grid in zip(idx_ref, SCHEDULE.scales, strict=True)]
    inputs = jax.jit(VQTokenizer.next_inputs, static_argnums=2)(tokenizer, [jnp.asarray(i) for i in official], SCHEDULE)
    differing = sum(int((np.asarray(a) != b).sum()) for a, b in zip(indices, official, strict=True))
    print(f"latent {_rel(f, f_ref):.1e}, recon {_rel(rec, rec_ref):.1e}, inputs {_rel(inputs, inputs_ref):.1e}, "
          f"indices differing {differing} of {sum(SCHEDULE.tokens_per_scale) * 2}")  # fmt: skip
    assert differing == 0
    assert _rel(f, f_ref) <= 1e-5 and _rel(rec, rec_ref) <= 1e-4 and _rel(inputs, inputs_ref) <= 1e-5


@pytest.mark.parametrize("shared_aln", [False, True])
def test_transformer_logits_match_official(harness, shared_aln):
    official_var, _ = harness
    _, var, config, params, _ = _built(harness, VQVAES["tiny"], shared_aln)
    rng = np.random.default_rng(1)
    labels = np.array([3, 999])
    x = rng.standard_normal((2, SCHEDULE.num_tokens - 1, config.bits)).astype(np.float32)
    with official_var.running(torch.float64):
        ref = var(torch.from_numpy(labels), torch.from_numpy(x).double()).numpy()
    ours = jax.jit(lambda p: Infinity(config).apply({"params": p}, x, SCHEDULE, labels=labels))(params)
    print(f"shared_aln={shared_aln}: logits {ours.shape}, max relative error {_rel(ours, ref):.1e}")
    assert ours.shape == ref.shape == (2, SCHEDULE.num_tokens, config.vocab)
    assert _rel(ours, ref) <= 1e-4


@pytest.mark.parametrize("shared_aln", [False, True])
def test_greedy_generation_matches_official(harness, shared_aln):
    """top_k = 1 makes both samplers deterministic: every scale's indices and the decoded image must agree
    (guidance ramp, KV cache, codebook, bicubic/φ/area updates and the decoder)."""
    official_var, _ = harness
    _, var, config, params, tokenizer = _built(harness, VQVAES["tiny"], shared_aln)
    labels = np.array([7, 123])
    with official_var.running(torch.float64):
        ref = var.autoregressive_infer_cfg(2, torch.from_numpy(labels), g_seed=0, cfg=1.5, top_k=1, top_p=0.0)
    ref = ref.permute(0, 2, 3, 1).numpy() * 2 - 1
    out = generate_var(params, config, tokenizer, SCHEDULE, jax.random.key(0), labels=labels, cfg=1.5, top_k=1)
    print(f"shared_aln={shared_aln}: image max error {np.abs(np.asarray(out.images) - ref).max():.1e}")
    np.testing.assert_allclose(np.asarray(out.images), ref, atol=1e-4)


def test_exports_load_into_the_official_models_strictly(harness):
    vq = VQVAES["tiny"]
    vae, var, config, params, tokenizer = _built(harness, vq, shared_aln=False)
    exported_vae = convert_vqvae.export_state_dict(tokenizer.params, vq, SCHEDULE)
    exported_var = convert_transformer.export_state_dict(params, config, schedule=SCHEDULE)
    for module, exported in ((vae, exported_vae), (var, exported_var)):
        original = module.state_dict()
        assert sorted(exported) == sorted(original)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
        for k, v in module.state_dict().items():
            np.testing.assert_array_equal(v.numpy(), original[k].numpy(), err_msg=k)
