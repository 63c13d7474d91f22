"""The Selection pytree: which key/value blocks each query block attends, plus the element masks
(causal, window, sinks, documents) the kernel computes from positions. Block-sparse attention in
the style of BigBird / FlashAttention block-sparse (2020, 2022)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array or np.ndarray: static policies build numpy tables at trace time.

# Padding value for positions of padded key rows; they are masked by index, never by position.
PAD_POSITION = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    """Which keys each query attends, at block granularity plus element masks from positions.

    Shapes: Bs = 1 (shared by the batch) or B; Hs = 1 (shared by heads) or H; nQ = ceil(T /
    block_q); nK = ceil(S / block_k) main key blocks followed by nE = ceil(E / block_k) blocks of
    extra rows; block indices in `kv_blocks` run over [0, nK + nE).

    Block tables (the sparsity):
      kv_blocks [Bs, Hs, nQ, Kmax] int32: key blocks of each query block; entries [:counts] are
        live and distinct, entries [:full_counts] need no element mask (every pair is allowed).
      counts [Bs, Hs, nQ] int32; full_counts [Bs, Hs, nQ] int32 or None (= 0).
      q_blocks / q_slots [Bs, Hs, nK + nE, Qmax], q_counts / q_full_counts [Bs, Hs, nK + nE]: the
        transposed lists for the dK/dV backward (query block, and its slot in kv_blocks); built
        by the api when None.
    Element masks, computed in the kernel from positions (never a materialized [T, S] mask):
      q_positions [Bs, T], k_positions [Bs, S] int32; q_segment_ids [Bs, T] / k_segment_ids [Bs, S]
      (document masking: equal ids only) or None. A query at position p sees a main key at
      position j iff same segment, (not causal or p >= j), and (window is None or |p - j| <
      window or j < sink_tokens).
    Extra rows (sinks summaries, pooled core tokens), attended through blocks nK.. like any key:
      extra_k / extra_v [Be, E, G, D] (Be = 1 or B); extra_positions [Bs, E]; extra_segment_ids
      [Bs, E] or None. A query at p sees extra row e iff same segment, (not causal or p >=
      extra_positions[e]) and (extra_span is None or 0 <= p - extra_positions[e] < extra_span).
      The window never applies to extra rows.
    RoPE remap (StreamingLLM, LongHeads): kv_shift [Bs, Hs, nQ, Kmax] int32 or None moves the
      keys of each selected block by `shift` positions, i.e. rotates them by RoPE (rotate-half
      convention, frequencies rope_inv_freq [D // 2] float32) in float32 before the score; the
      masks still use the original positions.
    """

    kv_blocks: Array
    counts: Array
    q_positions: Array
    k_positions: Array
    q_segment_ids: Array | None = None
    k_segment_ids: Array | None = None
    full_counts: Array | None = None
    kv_shift: Array | None = None
    rope_inv_freq: Array | None = None
    extra_k: Array | None = None
    extra_v: Array | None = None
    extra_positions: Array | None = None
    extra_segment_ids: Array | None = None
    q_blocks: Array | None = None
    q_slots: Array | None = None
    q_counts: Array | None = None
    q_full_counts: Array | None = None
    # Static (pytree metadata).
    block_q: int = 64
    block_k: int = 64
    causal: bool = True
    window: int | None = None
    sink_tokens: int = 0
    extra_span: int | None = None

    # ---- derived sizes (static: from shapes) ----
    @property
    def n_q_blocks(self) -> int:
        return int(self.kv_blocks.shape[2])

    @property
    def n_main_blocks(self) -> int:
        return math.ceil(int(self.k_positions.shape[1]) / self.block_k)

    @property
    def n_extra(self) -> int:
        return 0 if self.extra_k is None else int(self.extra_k.shape[1])

    @property
    def n_extra_blocks(self) -> int:
        return math.ceil(self.n_extra / self.block_k)

    @property
    def n_kv_blocks(self) -> int:
        """Main plus extra key blocks: the range of the indices in kv_blocks."""
        return self.n_main_blocks + self.n_extra_blocks

    @property
    def has_transpose(self) -> bool:
        return self.q_blocks is not None

    def replace(self, **changes) -> Selection:
        return dataclasses.replace(self, **changes)


_META = ("block_q", "block_k", "causal", "window", "sink_tokens", "extra_span")
_DATA = tuple(f.name for f in dataclasses.fields(Selection) if f.name not in _META)
jax.tree_util.register_dataclass(Selection, data_fields=list(_DATA), meta_fields=list(_META))


# ---- table utilities shared by the api and the horizon builders (numpy or jax.numpy) ----


def _xp(*arrays):
    """numpy when every array is a concrete numpy array (static tables at trace time), else jnp."""
    return np if all(isinstance(a, np.ndarray) for a in arrays if a is not None) else jnp


def tables_from_masks(live, full, max_blocks: int | None = None):
    """Block tables from boolean block masks [..., nQ, nKV]: live pairs, full (unmasked) pairs.

    Returns (kv_blocks [..., nQ, Kmax], counts [..., nQ], full_counts [..., nQ]) with full blocks
    first, then partial ones, each in ascending block order; Kmax = max_blocks or, for numpy
    inputs, the largest count (at least 1). Rows with more live blocks than Kmax are truncated,
    so a traced caller must pass a true upper bound.
    """
    xp = _xp(live, full)
    n_kv = live.shape[-1]
    full = full & live
    # Unique sort keys: class (0 full, 1 partial, 2 dead) then block index.
    cls = xp.where(full, 0, xp.where(live, 1, 2)).astype(np.int32)
    key = cls * n_kv + xp.arange(n_kv, dtype=np.int32)
    counts = live.sum(-1).astype(np.int32)
    full_counts = full.sum(-1).astype(np.int32)
    if xp is np:
        kmax = max(int(counts.max(initial=0)), 1) if max_blocks is None else max_blocks
        assert counts.max(initial=0) <= kmax, (
            f"max_blocks={max_blocks} < live blocks {counts.max()}"
        )
        order = np.argsort(key, axis=-1, kind="stable")[..., : min(kmax, n_kv)]
    else:
        kmax = n_kv if max_blocks is None else max_blocks
        _, order = jax.lax.top_k(-key, min(kmax, n_kv))
    order = order.astype(np.int32)
    if order.shape[-1] < kmax:  # a requested width beyond nKV: pad (never read)
        order = xp.pad(order, [(0, 0)] * (order.ndim - 1) + [(0, kmax - order.shape[-1])])
    counts = xp.minimum(counts, order.shape[-1])
    full_counts = xp.minimum(full_counts, counts)
    return order, counts, full_counts


def slot_map(kv_blocks, counts, n_kv: int):
    """Dense [..., nQ, nKV] int32 map: the slot of block j in row i's table, or -1 if not live."""
    xp = _xp(kv_blocks, counts)
    kmax = kv_blocks.shape[-1]
    slots = xp.arange(kmax, dtype=np.int32)
    live = slots < counts[..., None]
    # Dead slots scatter to a dummy column n_kv, dropped afterwards.
    cols = xp.where(live, kv_blocks, n_kv).astype(np.int32)
    lead = kv_blocks.shape[:-1]
    if xp is np:
        out = np.full(lead + (n_kv + 1,), -1, np.int32)
        idx = np.indices(lead + (kmax,))
        out[tuple(idx[:-1]) + (cols,)] = np.broadcast_to(slots, lead + (kmax,))
        return out[..., :n_kv]
    flat_cols = cols.reshape(-1, kmax)
    rows = xp.arange(flat_cols.shape[0])[:, None]
    out = xp.full((flat_cols.shape[0], n_kv + 1), -1, np.int32)
    out = out.at[rows, flat_cols].set(xp.broadcast_to(slots, flat_cols.shape))
    return out[:, :n_kv].reshape(lead + (n_kv,))


def transpose_tables(kv_blocks, counts, full_counts, n_kv: int, max_q_blocks: int | None = None):
    """The kv-block -> query-blocks lists the dK/dV backward walks.

    Returns q_blocks, q_slots [..., nKV, Qmax], q_counts, q_full_counts [..., nKV]; full pairs
    first. Qmax = max_q_blocks, or the largest count for numpy input, or nQ when traced.
    """
    xp = _xp(kv_blocks, counts, full_counts)
    n_q = kv_blocks.shape[-2]
    smap = slot_map(kv_blocks, counts, n_kv)  # [..., nQ, nKV]
    fc = xp.zeros_like(counts) if full_counts is None else full_counts
    live_t = xp.swapaxes(smap >= 0, -1, -2)  # [..., nKV, nQ]
    full_t = xp.swapaxes((smap >= 0) & (smap < fc[..., None]), -1, -2)
    limit = max_q_blocks if max_q_blocks is not None else (None if xp is np else n_q)
    q_blocks, q_counts, q_full_counts = tables_from_masks(live_t, full_t, limit)
    smap_t = xp.swapaxes(smap, -1, -2)
    q_slots = xp.take_along_axis(smap_t, q_blocks, axis=-1)
    q_slots = xp.maximum(q_slots, 0).astype(np.int32)
    return q_blocks, q_slots, q_counts, q_full_counts


def with_transpose(sel: Selection, max_q_blocks: int | None = None) -> Selection:
    """`sel` with its transposed tables filled in (no-op when present)."""
    if sel.has_transpose:
        return sel
    qb, qs, qc, qf = transpose_tables(
        sel.kv_blocks, sel.counts, sel.full_counts, sel.n_kv_blocks, max_q_blocks
    )
    return sel.replace(q_blocks=qb, q_slots=qs, q_counts=qc, q_full_counts=qf)
