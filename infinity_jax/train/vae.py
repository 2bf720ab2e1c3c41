"""The BSQ-VAE tokenizer as a task of the shared training loop (REFERENCE §2.4–2.6).

    images uint8 ─▶ [-1, 1] ─▶ encoder ─▶ latent [B, h, w, d]
      ─▶ multi-scale BSQ over the template's full schedule (optionally flipping bits of the first scales)
      ─▶ decoder, unclamped ─▶ reconstruction x̂
    generator      4·|x − x̂|₁ + w_p·LPIPS(x, x̂) + mean_k (0.25·commitment_k + 0.1·entropy penalty_k / τ)
                   + g·w_g·(−mean D(x̂))
    discriminator  g·(hinge(D(x), D(sg(x̂))) + w_lc·LeCam)                 with g = [step ≥ disc_start]

The full schedule matters: the decoder must learn to decode the residual sum that the transformer later
predicts scale by scale, not just the finest scale. Both networks update in the same step, each with its own Adam
(β 0.9, 0.95; lr 1e-4; global-norm clip 1.0). An optional EMA of the generator is what the evaluation uses and
what is exported as the tokenizer (`workdir/tokenizer`, a params-only checkpoint that `tokenizer.checkpoint` and
`train.init_from` read).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from infinity_jax import config as config_lib
from infinity_jax import quantizer, sharding
from infinity_jax.eval import image_metrics
from infinity_jax.models.bsq_vae import BSQVAE, TokenizerConfig
from infinity_jax.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from infinity_jax.schedules import Schedule
from infinity_jax.tokenizer import Tokenizer
from infinity_jax.train import checkpoint, loop, optim, perceptual
from infinity_jax.train import frozen as frozen_towers


@struct.dataclass
class VAEState:
    step: jax.Array
    params: dict  # {"generator": BSQVAE params, "discriminator": PatchDiscriminator params}
    opt_state: dict  # the same two keys
    ema: Any  # the generator's parameters averaged over steps (None without EMA)
    lecam: jax.Array  # [2]: EMA of the discriminator's mean logit on real, then on reconstructed images


@struct.dataclass
class VAEFrozen:
    lpips: Any = None  # LPIPS-VGG16 parameters (None when the perceptual weight is 0)


@dataclasses.dataclass(frozen=True)
class VAEStepConfig:
    """Everything static about the step (hashable)."""

    tokenizer: TokenizerConfig
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    dtype: str = "float32"
    l1_weight: float = 4.0
    perceptual_weight: float = 1.0
    gan_weight: float = 1.0
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    disc_start: int = 0
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    inv_temperature: float = 100.0
    flip_scales: int = 0
    flip_prob: float = 0.0
    ema_decay: float = 0.0
    seed: int = 0
    rules: tuple = ()


def step_config(config: ml_collections.ConfigDict) -> VAEStepConfig:
    loss = config.loss
    return VAEStepConfig(
        tokenizer=config_lib.tokenizer_layout(config.tokenizer),
        discriminator=DiscriminatorConfig(config.discriminator.layers, config.discriminator.base_ch),
        dtype=config.tokenizer.dtype,
        l1_weight=loss.l1,
        perceptual_weight=loss.perceptual,
        gan_weight=loss.gan,
        lecam_weight=loss.lecam,
        lecam_decay=loss.lecam_decay,
        disc_start=loss.disc_start,
        commitment_weight=loss.commitment,
        entropy_weight=loss.entropy,
        inv_temperature=loss.inv_temperature,
        flip_scales=loss.flip_scales,
        flip_prob=loss.flip_prob,
        ema_decay=config.train.ema_decay,
        seed=config.seed,
        rules=tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding.rules),
    )


def _models(sc: VAEStepConfig):
    dtype = jnp.dtype(sc.dtype)
    return BSQVAE(sc.tokenizer, dtype), PatchDiscriminator(sc.discriminator, dtype)


def init_state(sc: VAEStepConfig, optimizers: dict, key) -> VAEState:
    """A fresh state with logically partitioned (boxed) parameters: `jax.eval_shape` it for shardings."""
    vae, disc = _models(sc)
    k_vae, k_disc = jax.random.split(key)
    pixels = jnp.zeros((1, 4 * sc.tokenizer.stride, 4 * sc.tokenizer.stride, 3))
    params = {"generator": vae.init(k_vae, pixels)["params"], "discriminator": disc.init(k_disc, pixels)["params"]}
    opt_state = {name: optimizers[name].init(params[name]) for name in params}
    ema = params["generator"] if sc.ema_decay > 0 else None
    return VAEState(jnp.zeros((), jnp.int32), params, opt_state, ema, jnp.zeros((2,), jnp.float32))


def reconstruct(sc: VAEStepConfig, params, images: jax.Array, schedule: Schedule, flips=None):
    """images [B, H, W, 3] in [-1, 1] -> (unclamped reconstruction [B, H, W, 3], MultiScaleQuantized)."""
    vae, _ = _models(sc)
    latent_schedule = schedule.upsampled(2) if sc.tokenizer.patchify else schedule
    with nn.logical_axis_rules(sc.rules):
        latent = vae.apply({"params": params}, images, method=BSQVAE.encode)
        quantized = quantizer.multiscale_quantize(latent, latent_schedule, flips=flips)
        recon = vae.apply({"params": params}, quantized.latent, method=BSQVAE.decode_unclamped)
    return recon, quantized


def hinge_discriminator_loss(real: jax.Array, fake: jax.Array) -> jax.Array:
    """½(mean relu(1 − D(x)) + mean relu(1 + D(x̂))): 0 once real logits ≥ 1 and fake ones ≤ −1."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def lecam_regularizer(real: jax.Array, fake: jax.Array, ema_real: jax.Array, ema_fake: jax.Array) -> jax.Array:
    """LeCam (Tseng et al., 2021): keeps real logits from rising above the fakes' running mean and fake logits
    from falling below the reals' running mean, bounding the discriminator on small data."""
    return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake)))


def quantizer_losses(sc: VAEStepConfig, quantized) -> dict:
    """The BSQ auxiliary loss and its parts, averaged over the scales."""
    parts = []
    for q in quantized.scales:
        penalty, per_sample, codebook = quantizer.entropy_penalty(q.unit, sc.inv_temperature)
        commitment = quantizer.commitment_loss(q)
        parts.append(jnp.stack([commitment, penalty, per_sample, codebook]))
    commitment, penalty, per_sample, codebook = jnp.mean(jnp.stack(parts), axis=0)
    aux = sc.commitment_weight * commitment + sc.entropy_weight * penalty / sc.inv_temperature
    return {"quant_aux": aux, "commitment": commitment, "entropy_sample": per_sample, "entropy_codebook": codebook}


def _flips(sc: VAEStepConfig, key, images: jax.Array, schedule: Schedule):
    if sc.flip_scales <= 0 or sc.flip_prob <= 0:
        return None
    latent_schedule = schedule.upsampled(2) if sc.tokenizer.patchify else schedule
    return quantizer.flip_masks(key, images.shape[0], latent_schedule, sc.tokenizer.bits, sc.flip_prob, sc.flip_scales)


def generator_loss(gen_params, disc_params, frozen: VAEFrozen, images, schedule, key, gan_on, *, sc: VAEStepConfig):
    """(total, (reconstruction [B, H, W, 3], metrics)) of the generator on one batch."""
    recon, quantized = reconstruct(sc, gen_params, images, schedule, _flips(sc, key, images, schedule))
    terms = {"l1": jnp.mean(jnp.abs(recon - images)), **quantizer_losses(sc, quantized)}
    total = sc.l1_weight * terms["l1"] + terms["quant_aux"]
    if sc.perceptual_weight > 0:
        terms["lpips"] = jnp.mean(perceptual.lpips(frozen.lpips, images, recon))
        total = total + sc.perceptual_weight * terms["lpips"]
    if sc.gan_weight > 0:
        _, disc = _models(sc)
        with nn.logical_axis_rules(sc.rules):
            terms["g_adv"] = -jnp.mean(disc.apply({"params": disc_params}, recon))
        total = total + gan_on * sc.gan_weight * terms["g_adv"]
    return total, (recon, terms)


def discriminator_loss(disc_params, images, recon, lecam_ema, gan_on, *, sc: VAEStepConfig):
    """(total, (mean real and fake logits [2], metrics)) of the discriminator on one batch."""
    _, disc = _models(sc)
    with nn.logical_axis_rules(sc.rules):
        logits = disc.apply({"params": disc_params}, jnp.concatenate([images, jax.lax.stop_gradient(recon)]))
    real, fake = jnp.split(logits, 2)
    terms = {"d_hinge": hinge_discriminator_loss(real, fake), "d_real": jnp.mean(real), "d_fake": jnp.mean(fake)}
    total = terms["d_hinge"]
    if sc.lecam_weight > 0:
        terms["d_lecam"] = lecam_regularizer(real, fake, lecam_ema[0], lecam_ema[1])
        total = total + sc.lecam_weight * terms["d_lecam"]
    return gan_on * total, (jnp.stack([terms["d_real"], terms["d_fake"]]), terms)


def train_step(state: VAEState, frozen: VAEFrozen, batch: dict, *, sc: VAEStepConfig, optimizers: dict,
               learning_rate: optax.Schedule, schedule: Schedule):  # fmt: skip
    """One update of the generator and (from `disc_start` on) of the discriminator. Returns (state, metrics)."""
    key = jax.random.fold_in(jax.random.key(sc.seed), state.step)
    images = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    gan_on = (state.step >= sc.disc_start).astype(jnp.float32)
    params = state.params
    (loss, (recon, metrics)), grads = jax.value_and_grad(functools.partial(generator_loss, sc=sc), has_aux=True)(
        params["generator"], params["discriminator"], frozen, images, schedule, key, gan_on
    )
    new_params, opt_state = dict(params), dict(state.opt_state)
    updates, opt_state["generator"] = optimizers["generator"].update(
        grads, state.opt_state["generator"], params["generator"]
    )
    new_params["generator"] = optax.apply_updates(params["generator"], updates)
    lecam = state.lecam
    if sc.gan_weight > 0:
        d_loss_fn = functools.partial(discriminator_loss, sc=sc)
        (d_loss, (means, d_terms)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
            params["discriminator"], images, recon, state.lecam, gan_on
        )
        d_updates, opt_state["discriminator"] = optimizers["discriminator"].update(
            d_grads, state.opt_state["discriminator"], params["discriminator"]
        )
        new_params["discriminator"] = optax.apply_updates(params["discriminator"], d_updates)
        lecam = jnp.where(gan_on > 0, sc.lecam_decay * lecam + (1 - sc.lecam_decay) * means, lecam)
        metrics = {**metrics, **d_terms, "d_loss": d_loss, "d_grad_norm": optax.tree.norm(d_grads)}
    ema = state.ema
    if sc.ema_decay > 0:
        ema = jax.tree.map(lambda e, p: sc.ema_decay * e + (1 - sc.ema_decay) * p, ema, new_params["generator"])
    clamped = (jnp.clip(recon, -1.0, 1.0) + 1.0) / 2.0
    metrics = {
        **metrics,
        "loss": loss,
        "psnr": jnp.mean(image_metrics.psnr(clamped, (images + 1.0) / 2.0)),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(new_params["generator"]),
        "update_norm": optax.tree.norm(updates),
        "learning_rate": learning_rate(state.step),
    }
    return VAEState(state.step + 1, new_params, opt_state, ema, lecam), metrics


# -- the task ----------------------------------------------------------------------------------------------------


def make_optimizers(config: ml_collections.ConfigDict) -> tuple[dict, optax.Schedule]:
    """({"generator", "discriminator"} optimizers, the generator's learning-rate schedule)."""
    steps, batch = config.train.num_steps, config.train.batch_size
    generator, schedule = optim.make_optimizer(config.optim, batch, steps)
    disc_optim = ml_collections.ConfigDict(config.optim.to_dict())
    disc_optim.lr = config.optim.disc_lr if config.optim.disc_lr > 0 else config.optim.lr
    discriminator, _ = optim.make_optimizer(disc_optim, batch, steps)
    return {"generator": generator, "discriminator": discriminator}, schedule


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What the jitted step needs, built from shapes alone (the trainer and `infinity_jax.aot` share it)."""

    sc: VAEStepConfig
    optimizers: dict
    learning_rate: optax.Schedule
    init: Any  # key -> VAEState (boxed)
    abstract_state: VAEState  # sharded ShapeDtypeStructs
    batch_sharding: jax.sharding.NamedSharding

    def jit_step(self, schedule: Schedule, device_batch: dict, frozen: VAEFrozen):
        """(the jitted step (state, frozen, batch) -> (state, metrics), the same function unjitted)."""
        fn = functools.partial(train_step, sc=self.sc, optimizers=self.optimizers, learning_rate=self.learning_rate,
                               schedule=schedule)  # fmt: skip
        jitted = jax.jit(
            fn,
            in_shardings=(jax.tree.map(lambda x: x.sharding, self.abstract_state),
                          jax.tree.map(lambda x: x.sharding, frozen),
                          jax.tree.map(lambda _: self.batch_sharding, device_batch)),
            out_shardings=(jax.tree.map(lambda x: x.sharding, self.abstract_state), None),
            donate_argnums=0,
        )  # fmt: skip
        return jitted, fn


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> StepSetup:
    sc = step_config(config)
    optimizers, learning_rate = make_optimizers(config)
    init_fn = functools.partial(init_state, sc, optimizers)
    abstract = sharding.abstract_arrays(jax.eval_shape(init_fn, jax.random.key(0)), mesh, sc.rules)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    return StepSetup(sc, optimizers, learning_rate, init_fn, abstract, batch_sharding)


def make_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str) -> loop.Task:
    from infinity_jax.eval.reconstruction import ReconstructionEval

    setup = build(config, mesh)
    sc, abstract = setup.sc, setup.abstract_state
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    lpips_params = perceptual.load_params() if sc.perceptual_weight > 0 or config.eval.lpips else None
    frozen = VAEFrozen(lpips=jax.device_put(lpips_params, replicated) if sc.perceptual_weight > 0 else None)

    def init_from(state, path):
        generator = frozen_towers.tokenizer_params(path, sc.tokenizer, abstract.params["generator"])
        params = {**state.params, "generator": generator}
        ema = generator if state.ema is not None else None
        return state.replace(params=params, ema=ema)

    evaluator = ReconstructionEval(config, mesh, sc.rules, lpips_params, os.path.join(workdir, "samples"))

    def evaluate(state, step):
        params = state.ema if state.ema is not None else state.params["generator"]
        tokenizer = Tokenizer(params=params, config=sc.tokenizer)
        results = evaluator(tokenizer, step)
        checkpoint.save_params(os.path.join(workdir, "tokenizer"), params, config)
        return results

    return loop.Task(
        abstract_state=abstract,
        init=lambda key: nn.unbox(setup.init(key)),
        frozen=frozen,
        jit_step=functools.partial(setup.jit_step, frozen=frozen),
        cond="none",
        init_from=init_from,
        evaluate=evaluate if evaluator.enabled else None,
        # tok/s counts latent cells: what the tokenizer turns into tokens
        tokens=lambda schedule: schedule.grid[0] * schedule.grid[1],
    )


def train(config: ml_collections.ConfigDict, workdir: str):
    """Trains the tokenizer to `train.num_steps` (or until SIGTERM). Returns (the final VAEState, the metrics)."""
    return loop.run(config, workdir, make_task)
