"""Dense causal attention as a Selection: every causally reachable block is live (Vaswani et al.,
Attention Is All You Need, 2017), with document masking when segment ids are given."""

from __future__ import annotations

from horizon.attention.selection import Selection, as_positions, build_self


def dense_causal(positions, segment_ids=None, *, block_q: int = 64, block_k: int = 64) -> Selection:
    """positions: [B, T] int (or an int T for 0..T-1); segment_ids: [B, T] or None."""
    pos, seg = as_positions(positions, segment_ids)
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
    )
