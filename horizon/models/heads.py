"""Training objectives over the LM's outputs. Next-token cross-entropy, averaged per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log p(target) per position, fp32 [B, T]."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy over positions with weight > 0 (a token's loss counts once, whatever its document)."""
    ce = token_cross_entropy(logits_BTV, targets_BT)
    w = weights_BT.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
