"""LongHeads (Lu et al., LongHeads: Multi-Head Attention is Secretly a Long Context Processor,
2024): each head attends only the chunks its query selects, so every head processes at most the
trained length; the selected chunks get remapped positions so RoPE distances stay in range."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horizon.attention.selection import (
    Selection,
    as_positions,
    block_means,
    block_ranks,
    build_self,
    reachable,
)
from horizon.errors import ConfigError, ShapeError


def longheads(
    positions,
    segment_ids=None,
    *,
    q_BTHD,
    k_BSGD,
    trained_length: int,
    local_blocks: int = 1,
    block_q: int = 64,
    block_k: int = 64,
    rope_inv_freq=None,
) -> Selection:
    """Per-head chunk selection; chunks are key blocks of block_k tokens.

    For query block i and head h, the candidates are the causally reachable blocks of the
    query's document. Always kept: the document's first block (the attention sink) and the
    `local_blocks` newest blocks. The others are scored by q_i . c_j, q_i the mean query of the
    block (head h) and c_j the mean key of chunk j (its kv head), and the top
    trained_length // block_k - 1 - local_blocks are kept, so a head attends at most
    trained_length keys (Sec. 3.2's chunk selection with mean-pooled chunk representations).

    rope_inv_freq [D // 2]: when given, positions are remapped (Sec. 3.3): the kept non-local
    chunks are laid side by side just before the local blocks, in order (kv_shift), so no
    query-key RoPE distance exceeds trained_length + block_q.
    q_BTHD [B, T, H, D], k_BSGD [B, T, G, D]; positions [B, T] or an int T.
    """
    budget = trained_length // block_k - 1 - local_blocks
    if budget < 0 or local_blocks <= 0:
        raise ConfigError(
            f"longheads: trained_length={trained_length} must hold 1 + local_blocks={local_blocks} "
            f"blocks of block_k={block_k}, and local_blocks must be positive"
        )
    pos, seg = as_positions(positions, segment_ids)
    b, t, h, _d = q_BTHD.shape
    if k_BSGD.shape[1] != t or k_BSGD.shape[0] != b or h % k_BSGD.shape[2]:
        raise ShapeError(
            f"longheads: q_BTHD {tuple(q_BTHD.shape)} and k_BSGD {tuple(k_BSGD.shape)} do not match"
        )
    g = k_BSGD.shape[2]
    any_, _ = reachable(pos, seg, block_q=block_q, block_k=block_k)  # [Bs, nQ, nK]
    any_ = jnp.asarray(any_)
    n_k = any_.shape[-1]
    from_end, from_start = block_ranks(any_)
    forced = any_ & ((from_end < local_blocks) | (from_start == 0))  # [Bs, nQ, nK]
    candidates = any_ & ~forced

    q_rep = jax.lax.stop_gradient(block_means(q_BTHD, block_q))  # [B, nQ, H, D]
    c_rep = jax.lax.stop_gradient(block_means(k_BSGD, block_k))  # [B, nK, G, D]
    c_rep = jnp.repeat(c_rep, h // g, axis=2)  # [B, nK, H, D]
    score = jnp.einsum("bqhd,bkhd->bhqk", q_rep, c_rep)
    score = jnp.where(candidates[:, None], score, -jnp.inf)
    k_top = min(budget, n_k)
    if k_top > 0:
        top_val, top_idx = jax.lax.top_k(score, k_top)
        picked = jnp.zeros(score.shape, bool)
        picked = jnp.any(
            jax.nn.one_hot(top_idx, n_k, dtype=bool) & (top_val > -jnp.inf)[..., None], axis=-2
        )
    else:
        picked = jnp.zeros(score.shape, bool)
    structure = picked | forced[:, None]  # [B, H, nQ, nK]

    shift = None
    if rope_inv_freq is not None:
        local = (from_end < local_blocks) & any_  # [Bs, nQ, nK]
        first_local = jnp.argmax(local, axis=-1)[:, None, :, None]  # [Bs, 1, nQ, 1]
        far = structure & ~local[:, None]
        rank = jnp.cumsum(far, -1) - 1
        m = far.sum(-1, keepdims=True)
        j = jnp.arange(n_k)
        # Block j moves to slot first_local - m + rank: a shift of that many blocks (>= 0).
        shift = jnp.where(far, (first_local - m + rank - j) * block_k, 0).astype(jnp.int32)
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        structure=structure,
        shift=shift,
        rope_inv_freq=rope_inv_freq,
        max_blocks=min(n_k, budget + local_blocks + 2),
    )
