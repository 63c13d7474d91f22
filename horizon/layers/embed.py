"""Token embedding; `attend` reuses the table as the output projection when embeddings are tied."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.layers.params import normal, param


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, rngs: nnx.Rngs, compute_dtype=jnp.float32):
        self.embedding = param(rngs, normal(std), (vocab, dim), ("vocab", "embed"))
        self.compute_dtype = compute_dtype

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.compute_dtype)

    def attend(self, x_BTM: jax.Array) -> jax.Array:
        """Logits against the embedding table, fp32 (the head stays high precision)."""
        return jnp.einsum("btm,vm->btv", x_BTM.astype(jnp.float32), self.embedding[...].astype(jnp.float32))
