"""Sampling by full recomputation over a fixed-length buffer (one compiled forward, no KV cache).

Simple and exact; cached decoding with KV-cache policies belongs in horizon.infer.cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample(model, prompt: np.ndarray, *, max_new_tokens: int, temperature: float = 0.8,
           seed: int = 0, window: int | None = None) -> np.ndarray:
    """Extend int token array `prompt` [P] by `max_new_tokens` tokens; temperature 0 is greedy.

    The model sees the last `window` tokens (default: prompt + new tokens) left-aligned in a
    fixed buffer, so every step reuses one compiled forward.
    """
    from horizon.errors import ConfigError

    if temperature < 0:
        raise ConfigError(f"temperature {temperature} must be >= 0")
    graphdef, params = nnx.split(model)
    W = window or (len(prompt) + max_new_tokens)

    @jax.jit
    def next_token(params, buf_1W, length, key):
        logits = nnx.merge(graphdef, params)(buf_1W)[0, length - 1]
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    tokens = list(int(t) for t in prompt)
    key = jax.random.PRNGKey(seed)
    for i in range(max_new_tokens):
        ctx = tokens[-W:]
        buf = np.zeros((1, W), np.int32)
        buf[0, : len(ctx)] = ctx
        tok = next_token(params, jnp.asarray(buf), len(ctx), jax.random.fold_in(key, i))
        tokens.append(int(tok))
    return np.array(tokens[len(prompt):], np.int32)
