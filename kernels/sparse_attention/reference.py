"""The specification of block-sparse attention over a Selection: dense masked softmax attention in
plain jnp (fp32 softmax), with the block set expanded to a [T, S + E] mask. Readable, slow
(O(T * S) memory); the tests compare the XLA and Pallas paths against it."""

from __future__ import annotations

import jax.numpy as jnp

from kernels.sparse_attention.masks import element_mask, shift_keys
from kernels.sparse_attention.selection import Selection, slot_map


def _dense_slots(sel: Selection, t: int, s: int):
    """[Bs, Hs, T, S + E] slot index of each (query, key) pair in its query block's table, or -1."""
    smap = slot_map(jnp.asarray(sel.kv_blocks), jnp.asarray(sel.counts), sel.n_kv_blocks)
    q_blk = jnp.arange(t) // sel.block_q
    k_blk = jnp.concatenate(
        [jnp.arange(s) // sel.block_k, sel.n_main_blocks + jnp.arange(sel.n_extra) // sel.block_k]
    )
    return smap[:, :, q_blk][:, :, :, k_blk]


def dense_mask(sel: Selection, t: int, s: int):
    """[Bs, Hs, T, S + E] bool: the allowed pairs, block set AND element masks."""
    live = _dense_slots(sel, t, s) >= 0
    k_pos = jnp.asarray(sel.k_positions)
    k_seg = sel.k_segment_ids
    e = sel.n_extra
    if e:
        k_pos = jnp.concatenate([k_pos, jnp.asarray(sel.extra_positions)], axis=1)
        if k_seg is not None:
            k_seg = jnp.concatenate(
                [jnp.asarray(k_seg), jnp.asarray(sel.extra_segment_ids)], axis=1
            )
    is_extra = (jnp.arange(s + e) >= s)[None, :]
    elem = element_mask(
        jnp.asarray(sel.q_positions)[:, :, None],
        k_pos[:, None, :],
        q_seg=None if sel.q_segment_ids is None else jnp.asarray(sel.q_segment_ids)[:, :, None],
        k_seg=None if k_seg is None else k_seg[:, None, :],
        is_extra=is_extra,
        causal=sel.causal,
        window=sel.window,
        sink_tokens=sel.sink_tokens,
        extra_span=sel.extra_span,
    )
    return live & elem[:, None]


def attend_reference(q_BTHD, k_BSGD, v_BSGD, sel: Selection, *, scale=None, softcap=None):
    """out [B, T, H, D] = softmax over the allowed keys of (q . k) * scale (soft-capped); rows
    with no allowed key give 0. Keys and values are k/v followed by the selection's extra rows."""
    b, t, h, d = q_BTHD.shape
    s, g = k_BSGD.shape[1], k_BSGD.shape[2]
    scale = d**-0.5 if scale is None else scale
    k_all, v_all = k_BSGD, v_BSGD
    if sel.n_extra:
        ek = jnp.broadcast_to(sel.extra_k, (b,) + sel.extra_k.shape[1:]).astype(k_BSGD.dtype)
        ev = jnp.broadcast_to(sel.extra_v, (b,) + sel.extra_v.shape[1:]).astype(v_BSGD.dtype)
        k_all = jnp.concatenate([k_BSGD, ek], axis=1)
        v_all = jnp.concatenate([v_BSGD, ev], axis=1)
    r = h // g
    mask = dense_mask(sel, t, s)  # [Bs, Hs, T, S+E]
    q_BGRTD = q_BTHD.reshape(b, t, g, r, d).transpose(0, 2, 3, 1, 4)
    if sel.kv_shift is None:
        logits = jnp.einsum("bgrtd,bsgd->bgrts", q_BGRTD, k_all, preferred_element_type=jnp.float32)
    else:
        # Each pair rotates its key by its block's shift: materialize the rotated keys per pair.
        slots = _dense_slots(sel, t, s)
        shift = jnp.take_along_axis(
            jnp.asarray(sel.kv_shift)[:, :, jnp.arange(t) // sel.block_q],
            jnp.maximum(slots, 0),
            axis=-1,
        )  # [Bs, Hs, T, S+E]
        shift = jnp.where(slots >= 0, shift, 0)
        shift = jnp.broadcast_to(shift, (b, h) + shift.shape[2:]).reshape(
            b, g, r, t, s + sel.n_extra
        )
        freqs = jnp.concatenate([sel.rope_inv_freq, sel.rope_inv_freq]).astype(jnp.float32)
        k_pair = shift_keys(k_all.transpose(0, 2, 1, 3)[:, :, None, None], shift, freqs)
        logits = jnp.einsum(
            "bgrtd,bgrtsd->bgrts", q_BGRTD, k_pair, preferred_element_type=jnp.float32
        )
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = jnp.broadcast_to(mask, (mask.shape[0], h) + mask.shape[2:])
    mask = jnp.broadcast_to(mask, (b,) + mask.shape[1:]).reshape(b, g, r, t, s + sel.n_extra)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    w = p / jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("bgrts,bsgd->bgrtd", w, v_all.astype(jnp.float32))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_BTHD.dtype)
