"""Sliding-window causal attention: each query sees the `window` most recent positions of its
document (Beltagy et al., Longformer, 2020; Mistral 7B, 2023)."""

from __future__ import annotations

from horizon.attention.selection import (
    Selection,
    as_positions,
    build_self,
    is_static,
    window_block_bound,
)
from horizon.errors import ConfigError


def sliding_window(
    positions, segment_ids=None, *, window: int, block_q: int = 64, block_k: int = 64
) -> Selection:
    """Query at position p sees keys at p - window < j <= p. positions [B, T] or an int T."""
    if window <= 0:
        raise ConfigError(f"sliding_window: window={window} must be positive")
    pos, seg = as_positions(positions, segment_ids)
    bound = None if is_static(pos, seg) else window_block_bound(window, block_q, block_k)
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        window=window,
        max_blocks=bound,
    )
