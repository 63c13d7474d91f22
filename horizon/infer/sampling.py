"""Next-token distributions from logits: temperature and nucleus (top-p) sampling (Holtzman et al.,
2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1: keep the smallest set of tokens whose
probability reaches p, renormalized). Temperature 0 is greedy: a one-hot distribution at the argmax,
so speculative decoding's acceptance rule covers greedy decoding too."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_mask(probs_BV: jax.Array, top_p: float) -> jax.Array:
    """bool [B, V]: the smallest set of tokens, taken in decreasing probability, holding >= top_p of
    the mass (a token is kept when the mass strictly before it is still below top_p)."""
    order = jnp.argsort(-probs_BV, axis=-1, stable=True)
    sorted_p = jnp.take_along_axis(probs_BV, order, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = before < top_p
    return jnp.zeros_like(keep_sorted).at[jnp.arange(probs_BV.shape[0])[:, None], order].set(keep_sorted)


def token_probs(logits_BV: jax.Array, *, temperature: float, top_p: float = 1.0) -> jax.Array:
    """float32 [B, V]: the distribution a token is drawn from (one-hot at the argmax if temperature 0)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1], dtype=jnp.float32)
    probs = jax.nn.softmax(logits_BV / temperature, axis=-1)
    if top_p < 1.0:
        probs = jnp.where(top_p_mask(probs, top_p), probs, 0.0)
        probs = probs / probs.sum(-1, keepdims=True)
    return probs


def draw(key: jax.Array, probs_BV: jax.Array) -> jax.Array:
    """int32 [B]: one token per row from `probs_BV` (zeros are never drawn)."""
    logp = jnp.where(probs_BV > 0, jnp.log(jnp.where(probs_BV > 0, probs_BV, 1.0)), -jnp.inf)
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def sample_token(key: jax.Array, logits_BV: jax.Array, *, temperature: float, top_p: float = 1.0) -> jax.Array:
    """int32 [B]: greedy when temperature is 0, else a draw from token_probs."""
    if temperature == 0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
    return draw(key, token_probs(logits_BV, temperature=temperature, top_p=top_p))
