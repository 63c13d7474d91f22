"""Padded, block-aligned operands shared by the XLA and Pallas paths: queries padded to nQ * block_q,
keys and values padded to nK * block_k and followed by the extra rows (padded to nE * block_k),
positions and segment ids laid out the same way, and which key rows are real."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kernels.sparse_attention.selection import PAD_POSITION, Selection


@dataclasses.dataclass(frozen=True)
class Packed:
    q: object  # [B, Tp, H, D]
    k: object  # [B, Sk, G, D], Sk = (nK + nE) * block_k
    v: object
    q_pos: object  # [Bs, Tp] int32
    k_pos: object  # [Bs, Sk] int32
    q_seg: object  # [Bs, Tp] int32 or None
    k_seg: object  # [Bs, Sk] int32 or None
    k_valid: np.ndarray  # [Sk] bool (static): real key rows
    is_extra: np.ndarray  # [Sk] bool (static)
    t: int
    s: int


def _pad_axis(x, axis: int, new: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, new - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def pack(q_BTHD, k_BSGD, v_BSGD, sel: Selection) -> Packed:
    """Pad and concatenate the operands of `sel` into the block-aligned layout."""
    b, t, _, _ = q_BTHD.shape
    s = k_BSGD.shape[1]
    bq, bk = sel.block_q, sel.block_k
    tp = sel.n_q_blocks * bq
    sp = sel.n_main_blocks * bk
    ep = sel.n_extra_blocks * bk
    e = sel.n_extra
    q = _pad_axis(q_BTHD, 1, tp)
    k = _pad_axis(k_BSGD, 1, sp)
    v = _pad_axis(v_BSGD, 1, sp)
    q_pos = _pad_axis(jnp.asarray(sel.q_positions, jnp.int32), 1, tp, PAD_POSITION)
    k_pos = _pad_axis(jnp.asarray(sel.k_positions, jnp.int32), 1, sp, PAD_POSITION)
    use_seg = sel.q_segment_ids is not None
    q_seg = k_seg = None
    if use_seg:
        # Padded queries get their own segment so they see nothing; padded keys are masked by index.
        q_seg = _pad_axis(jnp.asarray(sel.q_segment_ids, jnp.int32), 1, tp, -1)
        k_seg = _pad_axis(jnp.asarray(sel.k_segment_ids, jnp.int32), 1, sp, -2)
    if e:
        ek = jnp.broadcast_to(sel.extra_k, (b,) + tuple(sel.extra_k.shape[1:])).astype(k.dtype)
        ev = jnp.broadcast_to(sel.extra_v, (b,) + tuple(sel.extra_v.shape[1:])).astype(v.dtype)
        k = jnp.concatenate([k, _pad_axis(ek, 1, ep)], axis=1)
        v = jnp.concatenate([v, _pad_axis(ev, 1, ep)], axis=1)
        epos = _pad_axis(jnp.asarray(sel.extra_positions, jnp.int32), 1, ep, PAD_POSITION)
        epos = jnp.broadcast_to(epos, (k_pos.shape[0],) + epos.shape[1:])
        k_pos = jnp.concatenate([jnp.broadcast_to(k_pos, (epos.shape[0], sp)), epos], axis=1)
        if use_seg:
            eseg = _pad_axis(jnp.asarray(sel.extra_segment_ids, jnp.int32), 1, ep, -2)
            eseg = jnp.broadcast_to(eseg, (k_seg.shape[0],) + eseg.shape[1:])
            k_seg = jnp.concatenate([jnp.broadcast_to(k_seg, (eseg.shape[0], sp)), eseg], axis=1)
    idx = np.arange(sp + ep)
    k_valid = np.where(idx < sp, idx < s, idx - sp < e)
    is_extra = idx >= sp
    return Packed(q, k, v, q_pos, k_pos, q_seg, k_seg, k_valid, is_extra, t, s)
