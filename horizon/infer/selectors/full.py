"""The `full` decode selector: every live slot [0, length) of the cache, i.e. dense decode attention
expressed in the sparse-decode index contract (the anchor the sparse selectors are compared with)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from horizon.infer.selectors._common import check_shapes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Full:
    """Selects all slots [0, length) for every head; stateless."""

    page_size: int = 1

    def prepare(self, k_cache_BSGD, lengths_B, *, layer: int = 0, n_heads: int | None = None):
        return ()

    def init_shared(self, batch: int, n_heads: int):
        return ()

    def select(self, q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, *, layer: int = 0):
        """indices [B, 1, S] = 0..S-1 shared over heads, counts [B, 1] = length."""
        b, _, s, _, _ = check_shapes("full", q_BHD, k_cache_BSGD, lengths_B)
        idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, 1, s))
        counts = jnp.minimum(jnp.asarray(lengths_B, jnp.int32), s)[:, None]
        return idx, counts, layer_state, shared
