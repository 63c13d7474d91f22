"""Selections and the builders policies share: block statistics of positions and segment ids, the
blocks an element mask can reach (any pair allowed) or fully covers (every pair allowed), block
tables and their transposes. numpy at trace time when positions are static (an int T), jax.numpy
when they are traced arrays."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from horizon.errors import ShapeError
from kernels.sparse_attention.selection import (  # noqa: F401  (re-exported)
    Selection,
    slot_map,
    tables_from_masks,
    transpose_tables,
    with_transpose,
)

_BIG = np.int32(2**30)


def is_static(*arrays) -> bool:
    return all(isinstance(a, np.ndarray) for a in arrays if a is not None)


def xp_of(*arrays):
    return np if is_static(*arrays) else jnp


def as_positions(positions, segment_ids=None):
    """(positions [Bs, T] int32, segment_ids [Bs, T] int32 or None) from an int T or arrays.

    An int T means one document at positions 0..T-1, shared by the batch (numpy: static tables).
    """
    if isinstance(positions, (int, np.integer)):
        if positions <= 0:
            raise ShapeError(f"positions: sequence length T={positions} must be positive")
        positions = np.arange(int(positions), dtype=np.int32)[None]
    elif isinstance(positions, np.ndarray):
        positions = positions.astype(np.int32)
    else:
        positions = jnp.asarray(positions, jnp.int32)
    if positions.ndim == 1:
        positions = positions[None]
    if positions.ndim != 2:
        raise ShapeError(
            f"positions: expected [B, T] or an int T, got shape {tuple(positions.shape)}"
        )
    if segment_ids is not None:
        xp = np if isinstance(segment_ids, np.ndarray) else jnp
        segment_ids = xp.asarray(segment_ids).astype(np.int32)
        if segment_ids.ndim == 1:
            segment_ids = segment_ids[None]
        if segment_ids.shape[1] != positions.shape[1]:
            raise ShapeError(
                f"segment_ids: shape {tuple(segment_ids.shape)} does not match positions {tuple(positions.shape)}"
            )
        if segment_ids.shape[0] != positions.shape[0]:
            b = max(segment_ids.shape[0], positions.shape[0])
            xp = xp_of(positions, segment_ids)
            positions = xp.broadcast_to(positions, (b, positions.shape[1]))
            segment_ids = xp.broadcast_to(segment_ids, (b, segment_ids.shape[1]))
    return positions, segment_ids


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """Per block [Bs, n]: min/max position and segment id over real rows, any/all rows real, and
    the (static) row index range."""

    pos_min: object
    pos_max: object
    seg_min: object
    seg_max: object
    any_valid: object
    all_valid: object
    idx_min: np.ndarray
    idx_max: np.ndarray


def block_stats(positions, segment_ids, block: int, valid_len: int | None = None) -> BlockStats:
    """Statistics of each block of `block` rows; rows >= valid_len (or past the end) are padding."""
    xp = xp_of(positions, segment_ids)
    bs, n = positions.shape
    nb = math.ceil(n / block)
    valid = np.arange(nb * block) < (n if valid_len is None else min(valid_len, n))
    pad = [(0, 0), (0, nb * block - n)]
    pos = xp.pad(positions, pad).reshape(bs, nb, block)
    seg = xp.zeros_like(positions) if segment_ids is None else segment_ids
    seg = xp.pad(seg, pad).reshape(seg.shape[0], nb, block)
    v = valid.reshape(nb, block)
    idx = np.arange(nb * block).reshape(nb, block)
    return BlockStats(
        pos_min=xp.where(v, pos, _BIG).min(-1),
        pos_max=xp.where(v, pos, -_BIG).max(-1),
        seg_min=xp.where(v, seg, _BIG).min(-1),
        seg_max=xp.where(v, seg, -_BIG).max(-1),
        any_valid=v.any(-1),
        all_valid=v.all(-1),
        idx_min=np.where(v, idx, _BIG).min(-1),
        idx_max=np.where(v, idx, -_BIG).max(-1),
    )


def reachable_blocks(
    q: BlockStats, k: BlockStats, *, causal, window, sink_tokens, extra, extra_span, same_index
):
    """(any, all) [Bs, nQ, nK] for main keys (extra=False) or extra rows (extra=True).

    any: a superset of the block pairs holding an allowed element pair (a conjunction of necessary
    conditions on the blocks' ranges); all: a subset whose every element pair is allowed.
    same_index: queries and keys index the same sequence (self-attention); then row-index ranges
    tighten `any`, valid because within a document positions grow at least as fast as the index
    (packing resets them per document, position synthesis only skips ahead).
    """
    xp = xp_of(q.pos_min, k.pos_min)
    qmin, qmax = q.pos_min[:, :, None], q.pos_max[:, :, None]
    kmin, kmax = k.pos_min[:, None, :], k.pos_max[:, None, :]
    any_ = (q.seg_min[:, :, None] <= k.seg_max[:, None, :]) & (
        k.seg_min[:, None, :] <= q.seg_max[:, :, None]
    )
    any_ = any_ & k.any_valid[None, None, :]
    single = (q.seg_min == q.seg_max)[:, :, None] & (k.seg_min == k.seg_max)[:, None, :]
    all_ = single & (q.seg_min[:, :, None] == k.seg_min[:, None, :])
    all_ = all_ & q.all_valid[None, :, None] & k.all_valid[None, None, :]
    qi_min, qi_max = q.idx_min[None, :, None], q.idx_max[None, :, None]
    ki_min, ki_max = k.idx_min[None, None, :], k.idx_max[None, None, :]
    use_idx = same_index and not extra
    if causal:
        any_ = any_ & (qmax >= kmin)
        all_ = all_ & (kmax <= qmin)
        if use_idx:
            any_ = any_ & (qi_max >= ki_min)
    if extra:
        if extra_span is not None:
            any_ = any_ & (qmax >= kmin) & (qmin - kmax < extra_span)
            all_ = all_ & (qmin >= kmax) & (qmax - kmin < extra_span)
    elif window is not None:
        near_any = qmin - kmax < window
        near_all = qmax - kmin < window
        if use_idx:
            near_any = near_any & (qi_min - ki_max < window)
        if not causal:
            near_any = near_any & (kmin - qmax < window)
            if use_idx:
                near_any = near_any & (ki_min - qi_max < window)
            near_all = near_all & (kmax - qmin < window)
        if sink_tokens:
            near_any = near_any | (kmin < sink_tokens)
            near_all = near_all | (kmax < sink_tokens)
        any_ = any_ & near_any
        all_ = all_ & near_all
    return xp.asarray(any_), xp.asarray(all_)


def block_ranks(any_BQK, xp=jnp):
    """(rank of each reachable key block counted from the newest, from the document start), both 0
    at the end they count from: what local-window and sink-block rules compare against."""
    from_end = xp.flip(xp.cumsum(xp.flip(any_BQK, -1), -1), -1) - 1
    return from_end, xp.cumsum(any_BQK, -1) - 1


def build_self(positions_BT, segment_ids_BT, *, block_q: int, block_k: int, causal: bool = True,
               **kw) -> Selection:
    """`build` for self-attention: queries and keys are the same tokens (every policy's case)."""
    return build(q_positions=positions_BT, k_positions=positions_BT, q_segment_ids=segment_ids_BT,
                 k_segment_ids=segment_ids_BT, block_q=block_q, block_k=block_k, causal=causal, **kw)


def build(
    *,
    q_positions,
    k_positions,
    q_segment_ids=None,
    k_segment_ids=None,
    block_q: int,
    block_k: int,
    causal: bool = True,
    window: int | None = None,
    sink_tokens: int = 0,
    structure=None,
    extra_k=None,
    extra_v=None,
    extra_positions=None,
    extra_segment_ids=None,
    extra_span: int | None = None,
    shift=None,
    rope_inv_freq=None,
    max_blocks: int | None = None,
) -> Selection:
    """A Selection whose live blocks are those the element masks reach, intersected with
    `structure` [Bs, Hs, nQ, nK + nE] bool (a policy's block pattern; None = all).

    shift [Bs, Hs, nQ, nK + nE] int: RoPE shift of each (query block, key block) pair (see
    Selection.kv_shift). max_blocks: the table width Kmax, required to be an upper bound on live
    blocks per row when positions are traced (numpy inputs compute it exactly).
    """
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(blk, (int, np.integer)) or blk <= 0:
            raise ShapeError(f"selection: {name}={blk!r} must be a positive int")
    qs = block_stats(q_positions, q_segment_ids, block_q)
    ks = block_stats(k_positions, k_segment_ids, block_k)
    same_index = q_positions.shape[1] == k_positions.shape[1]
    any_m, all_m = reachable_blocks(
        qs,
        ks,
        causal=causal,
        window=window,
        sink_tokens=sink_tokens,
        extra=False,
        extra_span=None,
        same_index=same_index,
    )
    if extra_k is not None:
        es = block_stats(extra_positions, extra_segment_ids, block_k)
        any_e, all_e = reachable_blocks(
            qs,
            es,
            causal=causal,
            window=None,
            sink_tokens=0,
            extra=True,
            extra_span=extra_span,
            same_index=False,
        )
        xp = xp_of(any_m, any_e)
        b = max(any_m.shape[0], any_e.shape[0])
        cat = lambda a, c: xp.concatenate(
            [xp.broadcast_to(a, (b,) + a.shape[1:]), xp.broadcast_to(c, (b,) + c.shape[1:])],
            axis=-1,
        )
        any_m, all_m = cat(any_m, any_e), cat(all_m, all_e)
    xp = xp_of(any_m, structure, shift)
    live, full = any_m[:, None], all_m[:, None]  # [Bs, 1, nQ, nKV]
    if structure is not None:
        live = live & structure
        full = full & structure
        live, full = xp.broadcast_arrays(live, full)
    kv_blocks, counts, full_counts = tables_from_masks(live, full, max_blocks)
    kv_shift = None
    if shift is not None:
        sh = xp.broadcast_to(shift, kv_blocks.shape[:-1] + (shift.shape[-1],))
        kv_shift = xp.take_along_axis(sh, kv_blocks, axis=-1).astype(np.int32)
    sel = Selection(
        kv_blocks=kv_blocks,
        counts=counts,
        full_counts=full_counts,
        q_positions=q_positions,
        k_positions=k_positions,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
        kv_shift=kv_shift,
        rope_inv_freq=rope_inv_freq,
        extra_k=extra_k,
        extra_v=extra_v,
        extra_positions=extra_positions,
        extra_segment_ids=extra_segment_ids,
        block_q=int(block_q),
        block_k=int(block_k),
        causal=causal,
        window=window,
        sink_tokens=int(sink_tokens),
        extra_span=extra_span,
    )
    return with_transpose(sel)


def n_blocks(length: int, block: int) -> int:
    return math.ceil(length / block)


def window_block_bound(window: int, block_q: int, block_k: int) -> int:
    """Most key blocks a query block's window [p - window + 1, p] can touch."""
    return math.ceil((window - 1 + block_q) / block_k) + 1


def sink_block_bound(sink_tokens: int, block_k: int) -> int:
    """Most key blocks holding the first sink_tokens positions of the document a block starts in."""
    return 0 if sink_tokens <= 0 else math.ceil(sink_tokens / block_k) + 1


def block_index_ranges(n_q: int, n_kv: int):
    """(q block index [nQ, 1], kv block index [1, nKV]) int32 grids for structure masks."""
    return np.arange(n_q, dtype=np.int32)[:, None], np.arange(n_kv, dtype=np.int32)[None, :]


def reachable(
    positions, segment_ids, *, block_q: int, block_k: int, causal=True, window=None, sink_tokens=0
):
    """(any, all) [Bs, nQ, nK] block masks of self-attention over `positions` (see reachable_blocks)."""
    qs = block_stats(positions, segment_ids, block_q)
    ks = block_stats(positions, segment_ids, block_k)
    return reachable_blocks(
        qs,
        ks,
        causal=causal,
        window=window,
        sink_tokens=sink_tokens,
        extra=False,
        extra_span=None,
        same_index=True,
    )


def first_row_values(x, block: int):
    """[Bs, nQ] value of x [Bs, T] at the first row of each block."""
    return x[:, ::block]


def block_means(x_BSGD, block: int):
    """[B, nK, G, D] mean of x over each block of rows (the last block over its real rows)."""
    b, s = x_BSGD.shape[:2]
    nk = math.ceil(s / block)
    xp = jnp.pad(x_BSGD.astype(jnp.float32), [(0, 0), (0, nk * block - s), (0, 0), (0, 0)])
    n = np.minimum(block, s - np.arange(nk) * block).astype(np.float32)
    return xp.reshape(b, nk, block, *x_BSGD.shape[2:]).sum(2) / n[None, :, None, None]


def attention_flop_fraction(sel: Selection):
    """Fraction of dense causal attention's FLOPs that `sel` spends: mean over batch rows and heads
    of (live block pairs, main and extra) / (causal block pairs).

    Each live (query block, key block) pair costs the kernel one block_q x block_k tile of QK^T and
    PV whether or not its element mask keeps every entry, so block pairs, not element pairs, are
    what a policy spends; an extra block (sinks, EMA sinks, CCA core tokens) is a tile like any
    other. The denominator counts the pairs of the dense causal Selection on the same positions:
    blocks holding at least one (query, key) element pair of one document with the key not after
    the query. Self-attention only (queries and keys index the same sequence). Returns a float32
    scalar (numpy for static tables, jax for traced ones).
    """
    if sel.q_positions.shape[-1] != sel.k_positions.shape[-1]:
        raise ShapeError(
            f"attention_flop_fraction: queries ({sel.q_positions.shape[-1]}) and keys "
            f"({sel.k_positions.shape[-1]}) differ in length; it measures self-attention only"
        )
    xp = xp_of(sel.kv_blocks, sel.counts, sel.q_positions, sel.q_segment_ids)
    causal, _ = reachable(sel.q_positions, sel.q_segment_ids, block_q=sel.block_q, block_k=sel.block_k)
    causal_pairs = causal.sum((-1, -2)).astype(np.float32)  # [Bp]
    live_pairs = sel.counts.sum(-1).astype(np.float32)  # [Bs, Hs]
    return xp.mean(live_pairs / causal_pairs[:, None]).astype(np.float32)
