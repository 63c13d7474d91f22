"""TokenSelect at decode (Wu et al., 2024, "TokenSelect: Efficient Long-Context Inference and Length
Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection"): per-head q.k criticality,
softmax per head, a soft vote summed over heads, top-k tokens; the Selection Cache
reuses the last selection while the query stays similar to the one that made it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError
from horizon.infer.selectors._common import (
    check_nonneg,
    check_positive,
    check_shapes,
    compact,
    forced_mask,
    forced_tokens,
    group_vote,
    to_heads,
    topk_tokens,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSelect:
    """Top-`budget` tokens by the summed per-head softmax vote, plus sinks and a local window.

    vote: "group" sums the votes of the R query heads sharing a kv head (one list per kv group,
    what GQA caches can gather cheaply); "all" sums over every head (the paper's single list per
    layer). threshold: the selection is reused for a batch row while the cosine similarity of its
    current query (all heads flattened) with the query that made the cached selection is above
    it; None never reuses. n_heads: query heads H, needed to size the cached query in `prepare`
    (pass it here or to prepare).
    """

    budget: int = 512
    window: int = 64
    n_sinks: int = 4
    threshold: float | None = 0.9
    vote: str = "group"
    n_heads: int | None = None
    page_size: int = 1

    def __post_init__(self):
        check_positive("tokenselect", budget=self.budget)
        check_nonneg("tokenselect", window=self.window, n_sinks=self.n_sinks)
        if self.vote not in ("group", "all"):
            raise ConfigError(f"tokenselect: vote={self.vote!r} must be 'group' or 'all'")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"tokenselect: threshold={self.threshold} must be in [-1, 1] or None")

    def prepare(self, k_cache_BSGD, lengths_B, *, layer: int = 0, n_heads: int | None = None):
        """Empty selection cache: (query [B, H, D], top-k idx [B, Gv, k], live, valid [B])."""
        h = n_heads or self.n_heads
        if h is None:
            raise ConfigError(
                "tokenselect: the selection cache needs the number of query heads; "
                "pass n_heads=H to the selector or to prepare"
            )
        b, s, g, d = k_cache_BSGD.shape
        gv = 1 if self.vote == "all" else g
        k = min(self.budget, s)
        return {
            "q": jnp.zeros((b, h, d), jnp.float32),
            "idx": jnp.zeros((b, gv, k), jnp.int32),
            "live": jnp.zeros((b, gv, k), bool),
            "valid": jnp.zeros((b,), bool),
        }

    def init_shared(self, batch: int, n_heads: int):
        return ()

    def scores(self, q_BHD, k_cache_BSGD, lengths_B):
        """[B, Gv, S] the soft vote (Gv = G, or 1 for vote='all')."""
        v = group_vote(q_BHD, k_cache_BSGD, lengths_B)
        return v.sum(1, keepdims=True) if self.vote == "all" else v

    def select(self, q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, *, layer: int = 0):
        """indices [B, H or 1, budget + n_sinks + window], counts [B, H or 1]; updated cache."""
        b, h, s, _g, _d = check_shapes("tokenselect", q_BHD, k_cache_BSGD, lengths_B)
        k = min(self.budget, s)
        lengths = jnp.asarray(lengths_B, jnp.int32)
        allowed = ~forced_mask(lengths, s=s, window=self.window, n_sinks=self.n_sinks)
        allowed = allowed & (jnp.arange(s)[None, :] < lengths[:, None])

        def fresh(_):
            return topk_tokens(self.scores(q_BHD, k_cache_BSGD, lengths), allowed, k)

        reuse = self.reused(q_BHD, layer_state)
        # Skip the O(S) scoring when every row reuses (the point of the Selection Cache).
        new_idx, new_live = jax.lax.cond(
            jnp.all(reuse), lambda _: (layer_state["idx"], layer_state["live"]), fresh, None
        )
        top_idx = jnp.where(reuse[:, None, None], layer_state["idx"], new_idx)
        top_live = jnp.where(reuse[:, None, None], layer_state["live"], new_live)
        # A cached token the moved window now covers (or past a shrunk length) is dropped here.
        still = jnp.take_along_axis(
            jnp.broadcast_to(allowed[:, None], (b, top_idx.shape[1], s)), top_idx, -1
        )
        f_idx, f_live = forced_tokens(lengths, s=s, window=self.window, n_sinks=self.n_sinks)
        gv = top_idx.shape[1]
        idx = jnp.concatenate(
            [top_idx, jnp.broadcast_to(f_idx[:, None], (b, gv, f_idx.shape[-1]))], -1
        )
        live = jnp.concatenate(
            [top_live & still, jnp.broadcast_to(f_live[:, None], (b, gv, f_live.shape[-1]))], -1
        )
        idx, counts = compact(idx, live)
        state = {
            "q": jnp.where(reuse[:, None, None], layer_state["q"], q_BHD.astype(jnp.float32)),
            "idx": top_idx,
            "live": top_live,
            "valid": jnp.ones((b,), bool),
        }
        if gv == 1:  # one list for every head: decode_attend's shared (Hs = 1) form
            return idx, counts, state, shared
        return to_heads(idx, h), to_heads(counts, h), state, shared

    def reused(self, q_BHD, layer_state) -> jax.Array:
        """[B] bool: whether `select` would reuse the cached selection for this query."""
        if self.threshold is None:
            return jnp.zeros(q_BHD.shape[:1], bool)
        return layer_state["valid"] & (_cosine(q_BHD, layer_state["q"]) > self.threshold)


def _cosine(a_BHD, b_BHD):
    """[B] cosine similarity of two queries, all heads flattened into one vector."""
    a = a_BHD.astype(jnp.float32).reshape(a_BHD.shape[0], -1)
    b = b_BHD.astype(jnp.float32).reshape(b_BHD.shape[0], -1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, -1) / jnp.maximum(den, 1e-30)
