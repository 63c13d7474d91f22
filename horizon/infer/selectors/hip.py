"""HiP attention at decode (Lee et al., 2024, "A Training-Free Sub-Quadratic Cost Transformer Model
Serving Framework With Hierarchically Pruned Attention"): the prefill policy's hierarchical top-k
block search (horizon.attention.policies.hip.tree_topk_blocks) run for one query per head; the
selected key blocks are pages of block_k slots, plus sink and local blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from horizon.attention.policies.hip import tree_topk_blocks
from horizon.attention.selection import block_means
from horizon.errors import ShapeError
from horizon.infer.selectors._common import check_nonneg, check_positive, check_shapes, compact


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiP:
    """Per query head: the top-`budget` key blocks among the full blocks between the sink blocks
    and the local blocks (the newest local_blocks blocks, the one holding slot length-1 among
    them). page_size = block_k. The block mean keys are computed in `prepare` and only the blocks
    near the end of the cache are refreshed at each step (older blocks no longer change)."""

    budget: int = 8
    local_blocks: int = 1
    sink_blocks: int = 1
    block_k: int = 64

    def __post_init__(self):
        check_positive(
            "hip", budget=self.budget, local_blocks=self.local_blocks, block_k=self.block_k
        )
        check_nonneg("hip", sink_blocks=self.sink_blocks)

    @property
    def page_size(self) -> int:
        return self.block_k

    def _check(self, s: int):
        if s % self.block_k:
            raise ShapeError(
                f"hip: cache capacity S={s} is not a multiple of block_k={self.block_k}; pad the cache"
            )

    def prepare(self, k_cache_BSGD, lengths_B, *, layer: int = 0, n_heads: int | None = None):
        """{'kbar': [B, nK, G, D] mean key per block of block_k slots}."""
        self._check(k_cache_BSGD.shape[1])
        return {"kbar": block_means(k_cache_BSGD, self.block_k)}

    def init_shared(self, batch: int, n_heads: int):
        return ()

    def select(self, q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, *, layer: int = 0):
        """indices [B, H, budget + sink_blocks + local_blocks] page (block) ids, counts [B, H]."""
        b, h, s, g, _d = check_shapes("hip", q_BHD, k_cache_BSGD, lengths_B)
        self._check(s)
        bk, n_k = self.block_k, s // self.block_k
        lengths = jnp.asarray(lengths_B, jnp.int32)
        last = jnp.maximum(lengths - 1, 0) // bk  # block holding the newest slot
        # Refresh the means of the blocks that may have changed since the last step: the local
        # blocks and the one just before them (it was partial while it was local).
        n_new = min(self.local_blocks + 1, n_k)
        first = jnp.clip(last - n_new + 1, 0, n_k - n_new)
        rows = jax.vmap(lambda kc, f: jax.lax.dynamic_slice_in_dim(kc, f * bk, n_new * bk, axis=0))(
            k_cache_BSGD, first
        )
        fresh = block_means(rows, bk)  # [B, n_new, G, D]
        kbar = jax.vmap(lambda kb, f, x: jax.lax.dynamic_update_slice_in_dim(kb, x, f, axis=0))(
            layer_state["kbar"], first, fresh.astype(layer_state["kbar"].dtype)
        )
        local_lo = jnp.maximum(last - self.local_blocks + 1, 0)
        lo = jnp.minimum(jnp.full_like(last, self.sink_blocks), local_lo)
        lo_h = jnp.broadcast_to(lo[:, None, None], (b, h, 1))
        hi_h = jnp.broadcast_to(local_lo[:, None, None], (b, h, 1))
        kbar_h = jnp.repeat(kbar, h // g, axis=2).transpose(0, 2, 1, 3)  # [B, H, nK, D]
        q = q_BHD.astype(jnp.float32)[:, None, None]  # [B, nQ=1, bq=1, H, D]
        c_lo, c_hi = tree_topk_blocks(q, jnp.ones((1, 1), bool), kbar_h, lo_h, hi_h, self.budget)
        top_idx, top_live = c_lo[:, :, 0], (c_hi > c_lo)[:, :, 0]  # [B, H, budget]
        sinks = jnp.arange(self.sink_blocks, dtype=jnp.int32)[None, :]
        local = local_lo[:, None] + jnp.arange(self.local_blocks, dtype=jnp.int32)
        f_idx = jnp.concatenate([jnp.broadcast_to(sinks, (b, self.sink_blocks)), local], -1)
        f_live = jnp.concatenate([sinks < local_lo[:, None], local <= last[:, None]], -1)
        f_live = f_live & (lengths[:, None] > 0)
        idx = jnp.concatenate(
            [top_idx, jnp.broadcast_to(f_idx[:, None], (b, h, f_idx.shape[-1]))], -1
        )
        live = jnp.concatenate(
            [top_live, jnp.broadcast_to(f_live[:, None], (b, h, f_live.shape[-1]))], -1
        )
        idx, counts = compact(jnp.clip(idx, 0, n_k - 1), live)
        return idx, counts, {"kbar": kbar}, shared
