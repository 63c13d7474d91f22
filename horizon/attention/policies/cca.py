"""Core Context Aware attention (Chen et al., Core Context Aware Attention for Long Context Language
Modeling, 2024): each group of tokens is pooled into one core token by importance weights, and a
query attends the core tokens of finished groups (globality-pooling) plus a local window
(locality-preserved)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from horizon.attention.selection import (
    Selection,
    as_positions,
    build_self,
    is_static,
    window_block_bound,
    xp_of,
)
from horizon.errors import ConfigError, ShapeError


def cca(
    positions,
    segment_ids=None,
    *,
    q_BTHD,
    k_BSGD,
    v_BSGD,
    group: int = 16,
    window: int | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> Selection:
    """Core tokens as extra key/value rows plus a causal local window.

    Groups are the rows [c * group, (c + 1) * group). Group c's core key and value are
    sum_j w_j k_j and sum_j w_j v_j over the group's rows j that share the segment of its last
    real row e, with w = softmax_j(qbar_e . k_j / sqrt(D)) and qbar_e the mean of row e's
    queries over the heads of each kv head (the paper weighs a group's tokens by the attention
    its last token pays them). The core row is visible to queries of that segment at positions
    > position(e); the window (default 2 * group) covers the current and previous group.
    q_BTHD [B, T, H, D], k_BSGD and v_BSGD [B, T, G, D]; positions [B, T] or an int T.
    """
    window = 2 * group if window is None else window
    if group <= 0 or window <= 0:
        raise ConfigError(f"cca: group={group} and window={window} must be positive")
    pos, seg = as_positions(positions, segment_ids)
    b, t, h, d = q_BTHD.shape
    if k_BSGD.shape[:2] != (b, t) or v_BSGD.shape != k_BSGD.shape or h % k_BSGD.shape[2]:
        raise ShapeError(
            f"cca: q_BTHD {tuple(q_BTHD.shape)}, k_BSGD {tuple(k_BSGD.shape)}, v_BSGD "
            f"{tuple(v_BSGD.shape)} must share B, T and have H a multiple of G"
        )
    g = k_BSGD.shape[2]
    n_g = math.ceil(t / group)
    last = np.minimum((np.arange(n_g) + 1) * group, t) - 1  # last real row of each group
    rows = np.arange(n_g * group).reshape(n_g, group)
    row_ok = rows < t
    rows_c = np.minimum(rows, t - 1)
    xp = xp_of(pos, seg)
    seg_rows = None if seg is None else seg[:, rows_c]  # [Bs, nG, group]
    same = row_ok[None] if seg is None else row_ok[None] & (seg_rows == seg[:, last][:, :, None])

    qbar = (
        q_BTHD[:, last].astype(jnp.float32).reshape(b, n_g, g, h // g, d).mean(3)
    )  # [B, nG, G, D]
    kg = k_BSGD[:, rows_c].astype(jnp.float32)  # [B, nG, group, G, D]
    vg = v_BSGD[:, rows_c].astype(jnp.float32)
    logits = jnp.einsum("bcgd,bcjgd->bcgj", qbar, kg) / math.sqrt(d)
    logits = jnp.where(jnp.asarray(same)[:, :, None, :], logits, -jnp.inf)
    w = jnp.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    core_k = jnp.einsum("bcgj,bcjgd->bcgd", w, kg).astype(k_BSGD.dtype)
    core_v = jnp.einsum("bcgj,bcjgd->bcgd", w, vg).astype(v_BSGD.dtype)
    extra_pos = (pos[:, last] + 1).astype(np.int32)  # visible strictly after the group's end
    extra_seg = None if seg is None else seg[:, last]
    bound = None
    if not is_static(pos, seg):
        bound = window_block_bound(window, block_q, block_k) + math.ceil(n_g / block_k) + 1
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        window=window,
        extra_k=core_k,
        extra_v=core_v,
        extra_positions=xp.asarray(extra_pos),
        extra_segment_ids=extra_seg,
        max_blocks=bound,
    )
