"""LongGen's hybrid sparsity (Ge et al., A Little Goes a Long Way: Efficient Long Context Training
and Inference with Partial Contexts, 2024): the middle third of the layers keep full causal
attention; the bottom and top thirds attend strided key blocks, a local block window and the
sink block (block-sparse attention with GPU-friendly access)."""

from __future__ import annotations

import math

import numpy as np

from horizon.attention.selection import (
    Selection,
    as_positions,
    block_ranks,
    build_self,
    is_static,
    n_blocks,
    reachable,
    xp_of,
)
from horizon.errors import ConfigError


def full_layers(n_layers: int) -> range:
    """The layers that stay dense: the middle third (at least one)."""
    n_full = max(1, round(n_layers / 3))
    lo = (n_layers - n_full) // 2
    return range(lo, lo + n_full)


def longgen(
    positions,
    segment_ids=None,
    *,
    layer: int,
    n_layers: int,
    stride: int = 8,
    local_blocks: int = 4,
    sink_blocks: int = 1,
    block_q: int = 64,
    block_k: int = 64,
) -> Selection:
    """Layer `layer` of `n_layers`: dense causal in full_layers(n_layers), else key block j (of
    the query's document) is live iff it is among the `local_blocks` latest reachable blocks,
    among the first `sink_blocks` of the document, or j % stride == stride - 1 (strided blocks).
    Element masks: causal and documents only. positions [B, T] or an int T."""
    if not 0 <= layer < n_layers:
        raise ConfigError(f"longgen: layer={layer} must be in [0, n_layers={n_layers})")
    if stride <= 0 or local_blocks <= 0 or sink_blocks < 0:
        raise ConfigError(
            f"longgen: stride={stride}, local_blocks={local_blocks} must be positive, sink_blocks={sink_blocks} >= 0"
        )
    pos, seg = as_positions(positions, segment_ids)
    common = {"block_q": block_q, "block_k": block_k}
    if layer in full_layers(n_layers):
        return build_self(pos, seg, **common)
    xp = xp_of(pos, seg)
    any_, _ = reachable(pos, seg, block_q=block_q, block_k=block_k)  # [Bs, nQ, nK]
    n_k = any_.shape[-1]
    j = np.arange(n_k, dtype=np.int32)
    # Rank of each reachable block from the newest (0) and from the document start (0).
    from_end, from_start = block_ranks(any_, xp)
    structure = (from_end < local_blocks) | (from_start < sink_blocks) | (j % stride == stride - 1)
    bound = None
    if not is_static(pos, seg):
        bound = local_blocks + sink_blocks + math.ceil(n_blocks(pos.shape[1], block_k) / stride) + 1
    return build_self(pos, seg, **common, structure=(structure & any_)[:, None], max_blocks=bound)
