"""The optimizer of the released recipe (REFERENCE §3.8), as an optax chain.

AdamW β = (0.9, 0.97) with decoupled weight decay 0.005 on weight matrices and embeddings only (not on biases,
norms, AdaLN tables, attention scales, the level embedding, SOS start, the unconditional caption or the pooling
query, as the official exclusion list), global-norm clipping 5, peak lr = tblr · global_batch / 256 after a linear
warm-up, then constant (the released `lin0` schedule), cosine or linear decay.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def peak_learning_rate(optim: ml_collections.ConfigDict, global_batch: int) -> float:
    """`optim.lr` when positive, else the official `tblr · global_batch / 256`."""
    return optim.lr if optim.lr > 0 else optim.tblr * global_batch / 256


def learning_rate_schedule(optim: ml_collections.ConfigDict, global_batch: int, total_steps: int) -> optax.Schedule:
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"unknown optim.schedule {optim.schedule!r}; valid: {', '.join(SCHEDULES)}")
    peak = peak_learning_rate(optim, global_batch)
    warmup = min(optim.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * optim.end_ratio
    after = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_ratio),
        "linear": optax.linear_schedule(peak, end, decay_steps),
    }[optim.schedule]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """True for the leaves weight decay applies to: kernels and embeddings, except the level embedding."""

    def decays(path, _):
        # Dictionary keys only: boxed (logically partitioned) leaves add an attribute step to the path.
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] in ("kernel", "embedding") and "lvl_embed" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, global_batch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for `total_steps` optimizer updates."""
    schedule = learning_rate_schedule(optim, global_batch, total_steps)
    optimizer = optax.chain(
        optax.clip_by_global_norm(optim.clip) if optim.clip > 0 else optax.identity(),
        optax.adamw(
            schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask
        ),
    )
    return optimizer, schedule
