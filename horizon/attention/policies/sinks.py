"""Attention sinks plus a sliding window (Xiao et al., Efficient Streaming Language Models with
Attention Sinks, StreamingLLM, 2023): every query also sees the first `n_sinks` tokens of its
document; optionally the sinks' RoPE positions are remapped to sit just before the window."""

from __future__ import annotations

import numpy as np

from horizon.attention.selection import (
    Selection,
    as_positions,
    block_stats,
    build_self,
    first_row_values,
    is_static,
    sink_block_bound,
    window_block_bound,
    xp_of,
)
from horizon.errors import ConfigError


def sinks(
    positions,
    segment_ids=None,
    *,
    window: int,
    n_sinks: int = 4,
    block_q: int = 64,
    block_k: int = 64,
    rope_inv_freq=None,
) -> Selection:
    """Query at p sees keys with p - window < j <= p or j < n_sinks (positions within its document).

    rope_inv_freq [D // 2] (the model's RoPE frequencies): when given, a sink block lying wholly
    outside a query block's window is shifted (RoPE-rotated) by p0 - window, p0 the position of
    the query block's first row, so a sink sits about `window` positions from its queries as in
    StreamingLLM's cache (Sec. 3.2: positions within the cache, not the text). Approximate at
    block granularity: the distance stays within [window - n_sinks, window + block_q).
    """
    if window <= 0 or n_sinks < 0:
        raise ConfigError(f"sinks: window={window} must be positive and n_sinks={n_sinks} >= 0")
    pos, seg = as_positions(positions, segment_ids)
    bound = None
    if not is_static(pos, seg):
        bound = window_block_bound(window, block_q, block_k) + sink_block_bound(n_sinks, block_k)
    shift = None
    if rope_inv_freq is not None:
        xp = xp_of(pos, seg)
        ks = block_stats(pos, seg, block_k)
        p0 = first_row_values(pos, block_q)[:, :, None]  # [Bs, nQ, 1]
        out_of_window = ks.pos_max[:, None, :] < p0 - window + 1
        is_sink = ks.pos_min[:, None, :] < n_sinks
        shift = xp.where(out_of_window & is_sink, p0 - window, 0).astype(np.int32)[:, None]
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        window=window,
        sink_tokens=n_sinks,
        shift=shift,
        rope_inv_freq=rope_inv_freq,
        max_blocks=bound,
    )
