"""Squeezed Attention at decode (Hooper et al., 2024, "Squeezed Attention: Accelerating Long Context
Length LLM Inference"): offline k-means of the fixed context's keys per kv head; at
decode the query is scored against the centroids, each cluster's per-key attention estimated as
exp(q.C_i) / sum_j N_j exp(q.C_j) (N_j = cluster size), and the best clusters' keys are attended;
the hierarchical variant compares coarse centroids first and only the fine centroids
under the kept coarse ones. Tokens generated after `prepare` are always attended."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError
from horizon.infer.selectors._common import check_nonneg, check_positive, check_shapes, compact
from horizon.infer.selectors._kmeans import lloyd


@dataclasses.dataclass(frozen=True, kw_only=True)
class Squeezed:
    """Cluster-level selection over the context present at `prepare` (the fixed context).

    budget: at most this many fixed-context keys: clusters are taken in decreasing order of the
    estimated attention until the next one would exceed the budget (the paper thresholds the
    estimate instead; a static budget keeps shapes static). n_clusters, iters: k-means per kv head.
    levels=2 adds n_coarse centroids (k-means of the fine centroids, weighted by size) of which the
    best coarse_keep are expanded. Always attended: n_sinks first slots, the last `window` slots and
    every slot written after prepare, up to max_new of them (older generated slots fall out).
    Selection is per query head (R heads share a kv head's centroids). Under a budget the
    ranking is that of q.C_i (the estimate's denominator is shared by all clusters); the
    cluster-size weighting only matters to a threshold rule (not confirmed against the paper's
    text here: no copy of its equations was reachable while writing this).
    """

    budget: int = 512
    n_clusters: int = 256
    iters: int = 10
    levels: int = 1
    n_coarse: int = 16
    coarse_keep: int = 4
    window: int = 64
    n_sinks: int = 4
    max_new: int = 256
    page_size: int = 1

    def __post_init__(self):
        check_positive(
            "squeezed",
            budget=self.budget,
            n_clusters=self.n_clusters,
            n_coarse=self.n_coarse,
            coarse_keep=self.coarse_keep,
        )
        check_nonneg(
            "squeezed",
            iters=self.iters,
            window=self.window,
            n_sinks=self.n_sinks,
            max_new=self.max_new,
        )
        if self.levels not in (1, 2):
            raise ConfigError(f"squeezed: levels={self.levels!r} must be 1 or 2")
        if self.levels == 2 and not self.coarse_keep <= self.n_coarse <= self.n_clusters:
            raise ConfigError(
                f"squeezed: need coarse_keep ({self.coarse_keep}) <= n_coarse ({self.n_coarse}) "
                f"<= n_clusters ({self.n_clusters}) for levels=2"
            )

    def prepare(self, k_cache_BSGD, lengths_B, *, layer: int = 0, n_heads: int | None = None):
        """k-means of each row's keys [0, length) per kv head; the state holds the centroids [B, G,
        C, D], sizes [B, G, C], assign [B, G, S] (C for slots past the fixed context), the slots
        sorted by cluster (perm [B, G, S]) with each cluster's start (offsets [B, G, C]), the fixed
        length l0 [B] and, for levels=2, coarse centroids/sizes [B, G, Cc, ...] and parent [B, G, C]."""
        _b, s, _g, _d = k_cache_BSGD.shape
        if self.n_clusters > s:
            raise ConfigError(
                f"squeezed: n_clusters={self.n_clusters} exceeds the cache capacity S={s}"
            )
        l0 = jnp.asarray(lengths_B, jnp.int32)
        k_BGSD = jnp.moveaxis(k_cache_BSGD, 2, 1)
        fit = jax.vmap(
            jax.vmap(
                lambda x, n: lloyd(x, n, n_clusters=self.n_clusters, iters=self.iters), (0, None)
            ),
            (0, 0),
        )
        cent, assign, sizes = fit(k_BGSD, l0)
        perm = jnp.argsort(assign, axis=-1, stable=True).astype(jnp.int32)
        offsets = (jnp.cumsum(sizes, -1) - sizes).astype(jnp.int32)
        state = {
            "centroids": cent,
            "sizes": sizes,
            "assign": assign,
            "perm": perm,
            "offsets": offsets,
            "l0": l0,
        }
        if self.levels == 2:
            # Empty fine clusters get weight 0 and are sorted to the end so init skips them.
            order = jnp.argsort(sizes <= 0, axis=-1, stable=True)
            cs = jnp.take_along_axis(cent, order[..., None], -2)
            ws = jnp.take_along_axis(sizes, order, -1)
            n_ne = (sizes > 0).sum(-1)
            fit2 = jax.vmap(
                jax.vmap(
                    lambda x, n, w: lloyd(
                        x, n, n_clusters=self.n_coarse, iters=self.iters, weights_N=w
                    )
                )
            )
            coarse, parent_sorted, csizes = fit2(cs, n_ne, ws)
            inv = jnp.argsort(order, axis=-1)
            state.update(
                coarse=coarse,
                coarse_sizes=csizes,
                parent=jnp.take_along_axis(parent_sorted, inv, -1),
            )
        return state

    def init_shared(self, batch: int, n_heads: int):
        return ()

    def cluster_scores(self, q_BHD, state):
        """[B, G, R, C] the paper's per-key attention estimate of each fine cluster; -1 marks the
        ineligible ones (empty, or with levels=2 under a coarse centroid that was not kept)."""
        b, h, d = q_BHD.shape
        g = state["centroids"].shape[1]
        q = q_BHD.astype(jnp.float32).reshape(b, g, h // g, d) * d**-0.5
        est = _estimate(jnp.einsum("bgrd,bgcd->bgrc", q, state["centroids"]), state["sizes"])
        if self.levels == 2:
            cest = _estimate(
                jnp.einsum("bgrd,bgcd->bgrc", q, state["coarse"]), state["coarse_sizes"]
            )
            _, keep = jax.lax.top_k(cest, self.coarse_keep)  # [B, G, R, keep]
            kept = (state["parent"][:, :, None, :, None] == keep[:, :, :, None, :]).any(-1)
            est = jnp.where(kept, est, -1.0)
        return est

    def select(self, q_BHD, k_cache_BSGD, lengths_B, layer_state, shared, *, layer: int = 0):
        """indices [B, H, budget + n_sinks + window + max_new], counts [B, H]."""
        b, h, s, g, _d = check_shapes("squeezed", q_BHD, k_cache_BSGD, lengths_B)
        r = h // g
        st = layer_state
        est = self.cluster_scores(q_BHD, st)  # [B, G, R, C]
        sizes = jnp.broadcast_to(st["sizes"][:, :, None, :], est.shape)
        size_eff = jnp.where(est >= 0, sizes, 0.0).astype(jnp.int32)
        order = jnp.argsort(-est, axis=-1, stable=True)  # best cluster first, ties to lower id
        sz = jnp.take_along_axis(size_eff, order, -1)
        cum = jnp.cumsum(sz, -1)
        picked_o = (sz > 0) & (cum <= self.budget)  # a prefix of the order: cum is monotone
        n_tok = jnp.sum(jnp.where(picked_o, sz, 0), -1)  # [B, G, R]
        picked = jnp.take_along_axis(picked_o, jnp.argsort(order, axis=-1), -1)  # by cluster id

        # Slot j of the budget -> the cluster holding the j-th picked key -> that key's slot.
        j = jnp.arange(self.budget, dtype=jnp.int32)
        p = jax.vmap(lambda c: jnp.searchsorted(c, j, side="right"))(cum.reshape(-1, cum.shape[-1]))
        p = jnp.minimum(p.reshape(cum.shape[:-1] + (self.budget,)), cum.shape[-1] - 1)
        c = jnp.take_along_axis(order, p, -1)
        within = j - (jnp.take_along_axis(cum, p, -1) - jnp.take_along_axis(sz, p, -1))
        start = jnp.take_along_axis(jnp.broadcast_to(st["offsets"][:, :, None], sizes.shape), c, -1)
        pos = jnp.clip(start + within, 0, s - 1)
        perm = jnp.broadcast_to(st["perm"][:, :, None], (b, g, r, s))
        top_idx = jnp.take_along_axis(perm, pos, -1)
        top_live = j < n_tok[..., None]

        # Forced: sinks, and the recent slots [min(length - window, l0), length) (generated ones).
        lengths = jnp.asarray(lengths_B, jnp.int32)
        n_rec = self.window + self.max_new
        rec = lengths[:, None] - n_rec + jnp.arange(n_rec, dtype=jnp.int32)
        rec_lo = jnp.maximum(jnp.minimum(lengths - self.window, st["l0"]), self.n_sinks)
        sinks = jnp.broadcast_to(jnp.arange(self.n_sinks, dtype=jnp.int32), (b, self.n_sinks))
        f_idx = jnp.concatenate([sinks, rec], -1)
        f_live = jnp.concatenate([sinks < lengths[:, None], rec >= rec_lo[:, None]], -1)
        f_live = f_live & (f_idx >= 0) & (f_idx < lengths[:, None])
        f_idx = jnp.clip(f_idx, 0, s - 1)
        # A forced slot of the fixed context whose cluster was picked is already in the list.
        a = jnp.take_along_axis(
            st["assign"], jnp.broadcast_to(f_idx[:, None], (b, g, f_idx.shape[-1])), -1
        )
        in_picked = jnp.take_along_axis(
            jnp.pad(picked, ((0, 0), (0, 0), (0, 0), (0, 1))),  # assign == C: not clustered
            jnp.broadcast_to(a[:, :, None], (b, g, r, a.shape[-1])),
            -1,
        )
        fixed = f_idx[:, None, None] < st["l0"][:, None, None, None]
        f_live = f_live[:, None, None] & ~(in_picked & fixed)
        idx = jnp.concatenate(
            [top_idx, jnp.broadcast_to(f_idx[:, None, None], (b, g, r, f_idx.shape[-1]))], -1
        )
        live = jnp.concatenate([top_live, f_live], -1)
        idx, counts = compact(idx.reshape(b, h, -1), live.reshape(b, h, -1))
        return idx, counts, layer_state, shared


def _estimate(logits_BGRC, sizes_BGC):
    """exp(l_i) / sum_j N_j exp(l_j) over non-empty clusters (-1 for empty ones)."""
    nonempty = (sizes_BGC > 0)[:, :, None, :]
    l = jnp.where(nonempty, logits_BGRC, -jnp.inf)
    m = jnp.max(l, -1, keepdims=True)
    e = jnp.where(nonempty, jnp.exp(l - m), 0.0)
    est = e / jnp.sum(e * sizes_BGC[:, :, None, :], -1, keepdims=True)
    return jnp.where(nonempty, est, -1.0)
