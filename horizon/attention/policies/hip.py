"""HiP attention (Lee et al., A Training-Free Sub-Quadratic Cost Transformer Model Serving Framework
With Hierarchically Pruned Attention, 2024): a training-free, per-head estimate of each query
block's top-k key blocks by a tree search that relies on attention locality (nearby keys score
alike), plus sink and local blocks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from horizon.attention.selection import (
    Selection,
    as_positions,
    block_means,
    block_ranks,
    build_self,
    reachable,
)
from horizon.errors import ConfigError, ShapeError


def hip(
    positions,
    segment_ids=None,
    *,
    q_BTHD,
    k_BSGD,
    budget: int = 8,
    local_blocks: int = 1,
    sink_blocks: int = 1,
    block_q: int = 64,
    block_k: int = 64,
) -> Selection:
    """Hierarchical top-`budget` key-block selection per head and query block.

    Candidates for query block i: the causally reachable blocks of its document other than the
    first `sink_blocks` and the newest `local_blocks` (both always kept). The candidate range is
    cut into 2k contiguous chunks (k = budget); each round scores every chunk by its
    representative, keeps the best k and splits each kept chunk in two halves; after
    ceil(log2(range / k)) rounds every kept chunk is a single block (Sec. 3, Alg. 1). A chunk's
    representative is its centre block (HiP's centre token, at block granularity): score =
    max over the queries q of the block of q . kbar, kbar the centre block's mean key.
    q_BTHD [B, T, H, D], k_BSGD [B, T, G, D]; positions [B, T] or an int T.
    """
    if budget <= 0 or local_blocks <= 0 or sink_blocks < 0:
        raise ConfigError(
            f"hip: budget={budget} and local_blocks={local_blocks} must be positive, sink_blocks={sink_blocks} >= 0"
        )
    pos, seg = as_positions(positions, segment_ids)
    b, t, h, d = q_BTHD.shape
    if k_BSGD.shape[1] != t or k_BSGD.shape[0] != b or h % k_BSGD.shape[2]:
        raise ShapeError(
            f"hip: q_BTHD {tuple(q_BTHD.shape)} and k_BSGD {tuple(k_BSGD.shape)} do not match"
        )
    g = k_BSGD.shape[2]
    any_, _ = reachable(pos, seg, block_q=block_q, block_k=block_k)  # [Bs, nQ, nK]
    any_ = jnp.asarray(any_)
    n_q, n_k = any_.shape[1:]
    from_end, from_start = block_ranks(any_)
    forced = any_ & ((from_end < local_blocks) | (from_start < sink_blocks))
    cand = any_ & ~forced
    # Candidates form one contiguous range [lo, hi) per query block (reachable blocks are).
    j = jnp.arange(n_k)
    lo = jnp.min(jnp.where(cand, j, n_k), axis=-1)
    hi = jnp.max(jnp.where(cand, j + 1, 0), axis=-1)
    hi = jnp.maximum(hi, lo)
    lo = jnp.broadcast_to(lo[:, None], (b, h, n_q))  # [B, H, nQ]
    hi = jnp.broadcast_to(hi[:, None], (b, h, n_q))

    q = jax.lax.stop_gradient(q_BTHD).astype(jnp.float32)
    tp = n_q * block_q
    q = jnp.pad(q, [(0, 0), (0, tp - t), (0, 0), (0, 0)]).reshape(b, n_q, block_q, h, d)
    q_valid = (np.arange(tp) < t).reshape(n_q, block_q)
    kbar = jax.lax.stop_gradient(block_means(k_BSGD, block_k))  # [B, nK, G, D]
    kbar = jnp.repeat(kbar, h // g, axis=2).transpose(0, 2, 1, 3)  # [B, H, nK, D]
    c_lo, c_hi = tree_topk_blocks(q, q_valid, kbar, lo, hi, budget)
    # Final chunks are single blocks (or empty): mark them.
    picked = jax.nn.one_hot(jnp.where(c_hi > c_lo, c_lo, n_k), n_k + 1, dtype=bool)[..., :n_k].any(
        -2
    )
    structure = (picked & cand[:, None]) | forced[:, None]  # [B, H, nQ, nK]
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        structure=structure,
        max_blocks=min(n_k, budget + local_blocks + sink_blocks + 1),
    )


def tree_topk_blocks(q_BQbHD, q_valid_Qb, kbar_BHKD, lo_BHQ, hi_BHQ, budget: int):
    """HiP's hierarchical top-`budget` block search (Lee et al. 2024, Sec. 3, Alg. 1), shared by the
    prefill policy above and the decode selector (horizon.infer.selectors.hip, nQ = block = 1).

    q_BQbHD [B, nQ, bq, H, D] queries per query block; q_valid_Qb [nQ, bq] bool (padding rows);
    kbar_BHKD [B, H, nK, D] mean key of each key block; lo_BHQ, hi_BHQ [B, H, nQ] the candidate
    block range [lo, hi) of each query block. The range is cut into 2k chunks (k = budget); each
    round scores a chunk by its centre block's mean key (max over the block's queries of q . kbar),
    keeps the best k and halves them, until every kept chunk is one block.
    Returns (c_lo, c_hi) [B, H, nQ, k]: chunk c is block c_lo when c_hi > c_lo, else empty.
    """
    n_k = kbar_BHKD.shape[2]
    q = q_BQbHD.astype(jnp.float32)
    kbar = kbar_BHKD.astype(jnp.float32)

    def score(c_lo, c_hi):  # chunks [B, H, nQ, C] -> [B, H, nQ, C]
        centre = jnp.clip((c_lo + c_hi - 1) // 2, 0, n_k - 1)
        rep = jax.vmap(jax.vmap(lambda kb, c: kb[c]))(kbar, centre)  # [B, H, nQ, C, D]
        s = jnp.einsum("bqihd,bhqcd->bhqci", q, rep)
        s = jnp.where(q_valid_Qb[None, None, :, None, :], s, -jnp.inf).max(-1)
        return jnp.where(c_hi > c_lo, s, -jnp.inf)

    k = budget
    lo, hi = lo_BHQ, hi_BHQ
    edges = lo[..., None] + ((hi - lo)[..., None] * jnp.arange(2 * k + 1)) // (2 * k)
    c_lo, c_hi = edges[..., :-1], edges[..., 1:]  # 2k chunks
    rounds = max(1, math.ceil(math.log2(max(n_k / (2 * k), 1)))) + 1
    for _ in range(rounds):
        _, keep = jax.lax.top_k(score(c_lo, c_hi), k)
        c_lo = jnp.take_along_axis(c_lo, keep, -1)
        c_hi = jnp.take_along_axis(c_hi, keep, -1)
        mid = (c_lo + c_hi + 1) // 2  # halves [lo, mid), [mid, hi); a single block stays whole
        c_lo = jnp.concatenate([c_lo, mid], -1)
        c_hi = jnp.concatenate([mid, c_hi], -1)
    _, keep = jax.lax.top_k(score(c_lo, c_hi), k)
    return jnp.take_along_axis(c_lo, keep, -1), jnp.take_along_axis(c_hi, keep, -1)

