"""TidalDecode (Yang et al., 2024, "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention"): the first layers attend fully; a token selection layer attends fully
and picks the top-k positions, which every following layer reuses (position persistent sparse
attention), until a re-selection (correction) layer in the middle of the stack picks again (Fig. 2: full
layers 0-1, selection at layer 2 and at one middle layer)."""

from __future__ import annotations

import dataclasses

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
class TidalDecode:
    """Layers below selection_layers[0] attend to every slot; a layer in selection_layers attends
    to every slot and stores its top-`budget` tokens in `shared`; every other layer attends to the
    last stored tokens plus sinks and the local window.

    selection_layers: default (2,), or (2, n_layers // 2) when n_layers is given (the paper's
    correction layer in the middle of the stack; stacks of 3 layers or fewer select at layer
    n_layers - 2). The decoder passes the model's n_layers. Scores are the per-head softmax of q.k summed
    over the query heads of each kv group (one list per kv group, repeated over its heads).
    """

    budget: int = 512
    window: int = 64
    n_sinks: int = 4
    selection_layers: tuple[int, ...] | None = None
    n_layers: int | None = None
    page_size: int = 1

    def __post_init__(self):
        check_positive("tidaldecode", budget=self.budget)
        check_nonneg("tidaldecode", window=self.window, n_sinks=self.n_sinks)
        layers = self.layers
        if (
            not layers
            or any(not isinstance(i, int) or i < 0 for i in layers)
            or list(layers) != sorted(set(layers))
        ):
            raise ConfigError(
                f"tidaldecode: selection_layers={self.selection_layers!r} must be increasing non-negative ints"
            )

    @property
    def layers(self) -> tuple[int, ...]:
        if self.selection_layers is not None:
            return tuple(self.selection_layers)
        if self.n_layers is None:
            return (2,)
        # Shallow stacks select earlier so that at least one layer reuses the selection (the
        # paper's layer 2 would leave a 3-layer model attending fully everywhere).
        first = max(0, min(2, self.n_layers - 2))
        mid = self.n_layers // 2
        return (first, mid) if first < mid < self.n_layers - 1 else (first,)

    def kind(self, layer: int) -> str:
        """'full' (before the first selection layer), 'select' or 'reuse'."""
        if layer in self.layers:
            return "select"
        return "full" if layer < self.layers[0] else "reuse"

    def k_total(self, s: int) -> int:
        return min(self.budget, s) + self.n_sinks + self.window

    def prepare(self, k_cache_BSGD, lengths_B, *, layer: int = 0, n_heads: int | None = None):
        return ()

    def init_shared(self, batch: int, n_heads: int):
        """The positions the last selection layer picked: idx [B, H, budget], live [B, H, budget].

        Sized by `budget`; select clips it to the cache capacity S when budget > S."""
        return {
            "idx": jnp.zeros((batch, n_heads, self.budget), jnp.int32),
            "live": jnp.zeros((batch, n_heads, self.budget), bool),
        }

    def select(self, q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, *, layer: int = 0):
        """Full/select layers: indices [B, 1, S], counts [B, 1] (every live slot); reuse layers:
        indices [B, H, budget + n_sinks + window], counts [B, H]."""
        b, h, s, _g, _d = check_shapes("tidaldecode", q_BHD, k_cache_BSGD, lengths_B)
        lengths = jnp.asarray(lengths_B, jnp.int32)
        kind = self.kind(layer)
        if kind in ("full", "select"):
            if kind == "select":
                shared = self._pick(q_BHD, k_cache_BSGD, lengths, shared)
            idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, 1, s))
            return idx, jnp.minimum(lengths, s)[:, None], layer_state, shared
        f_idx, f_live = forced_tokens(lengths, s=s, window=self.window, n_sinks=self.n_sinks)
        allowed = ~forced_mask(lengths, s=s, window=self.window, n_sinks=self.n_sinks)
        top_idx, top_live = shared["idx"], shared["live"]
        # Positions picked in a layer of this step are outside the window already; the check keeps
        # the entries distinct even if a caller reuses `shared` across steps.
        ok = jnp.take_along_axis(jnp.broadcast_to(allowed[:, None], (b, h, s)), top_idx, -1)
        idx = jnp.concatenate(
            [top_idx, jnp.broadcast_to(f_idx[:, None], (b, h, f_idx.shape[-1]))], -1
        )
        live = jnp.concatenate(
            [top_live & ok, jnp.broadcast_to(f_live[:, None], (b, h, f_live.shape[-1]))], -1
        )
        idx, counts = compact(idx, live)
        return idx, counts, layer_state, shared

    def _pick(self, q_BHD, k_cache_BSGD, lengths, shared):
        _b, h, _ = q_BHD.shape
        s = k_cache_BSGD.shape[1]
        allowed = ~forced_mask(lengths, s=s, window=self.window, n_sinks=self.n_sinks)
        allowed = allowed & (jnp.arange(s)[None, :] < lengths[:, None])
        k = min(self.budget, s)
        idx, live = topk_tokens(group_vote(q_BHD, k_cache_BSGD, lengths), allowed, k)
        pad = self.budget - k
        idx = jnp.pad(to_heads(idx, h), ((0, 0), (0, 0), (0, pad)))
        live = jnp.pad(to_heads(live, h), ((0, 0), (0, 0), (0, pad)))
        return {"idx": idx, "live": live}
