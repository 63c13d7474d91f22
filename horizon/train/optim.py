"""AdamW (Loshchilov & Hutter, 2019) with warmup + cosine or warmup-stable-decay (WSD; Hu et al.,
2024, MiniCPM) learning-rate schedules and global-norm gradient clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from horizon.config import Optim


def learning_rate(cfg: Optim, total_steps: int) -> optax.Schedule:
    """lr(step): linear warmup to cfg.lr, then cosine to min_lr_ratio * lr, WSD, or constant."""
    warm = max(cfg.warmup_steps, 0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, max(warm, 1)) if warm else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warm, 1), max(total_steps, warm + 1), floor)
    # WSD: warmup, hold at peak, then decay linearly to the floor over the last decay_fraction.
    decay = max(int(round(cfg.decay_fraction * total_steps)), 1)
    stable = max(total_steps - warm - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, floor, decay)],
        [warm, warm + stable],
    )


def _decay_mask(params):
    # Matrices decay; vectors (norm scales) do not.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: Optim, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask),
    )
