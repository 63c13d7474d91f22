"""Block-sparse attention in XLA: gather only the live key/value blocks of each query block, then a
dense masked softmax over them, chunked over query blocks to bound memory. The CPU path; its cost
is O(T * Kmax * block_k) instead of O(T * S)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sparse_attention.layout import pack
from kernels.sparse_attention.masks import element_mask, shift_keys
from kernels.sparse_attention.selection import Selection

# Elements per chunk of gathered keys (and of scores): bounds the working set to ~64 MB in fp32.
_CHUNK_ELEMENTS = 1 << 24


def _chunk_size(n_q: int, per_block: int) -> int:
    """Largest divisor of n_q whose chunk stays under _CHUNK_ELEMENTS."""
    best = 1
    for c in range(1, n_q + 1):
        if n_q % c == 0 and c * per_block <= _CHUNK_ELEMENTS:
            best = c
    return best


def attend_xla(q_BTHD, k_BSGD, v_BSGD, sel: Selection, *, scale=None, softcap=None):
    """Same contract as reference.attend_reference; differentiable by autodiff."""
    b, t, h, d = q_BTHD.shape
    g = k_BSGD.shape[2]
    r = h // g
    scale = d**-0.5 if scale is None else scale
    pk = pack(q_BTHD, k_BSGD, v_BSGD, sel)
    bq, bk = sel.block_q, sel.block_k
    n_q, n_kv = sel.n_q_blocks, sel.n_kv_blocks
    kv_blocks = jnp.asarray(sel.kv_blocks, jnp.int32)
    _bs, hs, _, kmax = kv_blocks.shape
    per_head = hs > 1
    gh, rr = (
        (h, 1) if per_head else (g, r)
    )  # heads that index the table, query heads per table head

    # Head-major blocks [B, Gh, nKV, bk, D], so the gathered keys of a head are contiguous and the
    # score and value products are plain batched matmuls over (batch, head, query block).
    kb = pk.k.reshape(b, n_kv, bk, g, d).transpose(0, 3, 1, 2, 4)
    vb = pk.v.reshape(b, n_kv, bk, g, d).transpose(0, 3, 1, 2, 4)
    if per_head:  # each query head gathers from its own kv head
        head_to_g = np.arange(h) // r
        kb, vb = kb[:, head_to_g], vb[:, head_to_g]
    kpos_b = pk.k_pos.reshape(pk.k_pos.shape[0], n_kv, bk)
    kseg_b = None if pk.k_seg is None else pk.k_seg.reshape(pk.k_seg.shape[0], n_kv, bk)
    kvalid_b = jnp.asarray(pk.k_valid.reshape(n_kv, bk))
    extra_b = jnp.asarray(pk.is_extra.reshape(n_kv, bk))

    q_blk = pk.q.reshape(b, n_q, bq, gh, rr, d).transpose(
        0, 3, 1, 4, 2, 5
    )  # [B, Gh, nQ, rr, bq, D]
    qpos_blk = pk.q_pos.reshape(pk.q_pos.shape[0], n_q, bq)
    qseg_blk = None if pk.q_seg is None else pk.q_seg.reshape(pk.q_seg.shape[0], n_q, bq)
    counts = jnp.asarray(sel.counts, jnp.int32)
    shift = None if sel.kv_shift is None else jnp.asarray(sel.kv_shift, jnp.int32)
    # One batch size for every selection array (each is 1 or B).
    bsel = max(kv_blocks.shape[0], kpos_b.shape[0], qpos_blk.shape[0])

    def _bcast(x):
        return None if x is None else jnp.broadcast_to(x, (bsel,) + tuple(x.shape[1:]))

    kv_blocks, counts, shift = _bcast(kv_blocks), _bcast(counts), _bcast(shift)
    kpos_b, kseg_b, qpos_blk, qseg_blk = map(_bcast, (kpos_b, kseg_b, qpos_blk, qseg_blk))
    freqs = None
    if shift is not None:
        freqs = jnp.concatenate([sel.rope_inv_freq, sel.rope_inv_freq]).astype(jnp.float32)

    c = _chunk_size(n_q, b * kmax * bk * max(gh * d, bq * h))
    n_ch = n_q // c

    def chunks(x, axis):  # [.., n_q, ..] -> [n_ch, .., c, ..]
        if x is None:
            return None
        shape = x.shape[:axis] + (n_ch, c) + x.shape[axis + 1 :]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    xs = (
        chunks(q_blk, 2),
        chunks(kv_blocks, 2),
        chunks(counts, 2),
        chunks(qpos_blk, 1),
        chunks(qseg_blk, 1),
        chunks(shift, 2),
    )

    def one_chunk(args):
        q_c, idx_c, cnt_c, qpos_c, qseg_c, shift_c = args
        # Gather the live blocks: keys [B, Gh, c, Kmax, bk, D], positions [Bs, Hs, c, Kmax, bk].
        idx_b = jnp.broadcast_to(idx_c, (b,) + idx_c.shape[1:])  # [B, Hs, c, Kmax]
        if per_head:
            take = jax.vmap(jax.vmap(lambda kbh, i: kbh[i]))
            kg, vg = take(kb, idx_b), take(vb, idx_b)
        else:
            take = jax.vmap(lambda kbb, i: kbb[:, i])
            kg, vg = take(kb, idx_b[:, 0]), take(vb, idx_b[:, 0])
        if shift_c is not None:
            sh = jnp.broadcast_to(shift_c, (b,) + shift_c.shape[1:])[
                ..., None
            ]  # [B, Hs, c, Kmax, 1]
            kg = shift_keys(kg, sh, freqs)
        kg = kg.reshape(b, gh, c, kmax * bk, d)
        vg = vg.reshape(b, gh, c, kmax * bk, d)
        take_pos = jax.vmap(lambda pb, i: pb[i])  # over the selection batch
        kpos = take_pos(kpos_b, idx_c)
        kseg = None if kseg_b is None else take_pos(kseg_b, idx_c)
        live = (jnp.arange(kmax) < cnt_c[..., None])[..., None]  # [Bs, Hs, c, Kmax, 1]
        valid = kvalid_b[idx_c] & live
        mask = element_mask(
            qpos_c[:, None, :, :, None],
            kpos.reshape(kpos.shape[:3] + (1, kmax * bk)),
            q_seg=None if qseg_c is None else qseg_c[:, None, :, :, None],
            k_seg=None if kseg is None else kseg.reshape(kseg.shape[:3] + (1, kmax * bk)),
            is_extra=extra_b[idx_c].reshape(idx_c.shape[:3] + (1, kmax * bk)),
            k_valid=valid.reshape(valid.shape[:3] + (1, kmax * bk)),
            causal=sel.causal,
            window=sel.window,
            sink_tokens=sel.sink_tokens,
            extra_span=sel.extra_span,
        )  # [Bs, Hs, c, bq, Kmax*bk]
        logits = jnp.einsum("bgcrqd,bgckd->bgcrqk", q_c, kg, preferred_element_type=jnp.float32)
        logits = logits * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        mask = mask[:, :, :, None]  # [Bs, Hs, c, 1, bq, K] against [B, Gh, c, rr, bq, K]
        logits = jnp.where(mask, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = p / jnp.where(l == 0, 1.0, l)
        return jnp.einsum(
            "bgcrqk,bgckd->bgcrqd", p.astype(vg.dtype), vg, preferred_element_type=jnp.float32
        )

    if n_ch == 1:
        out = one_chunk(tuple(None if x is None else x[0] for x in xs))[None]
    else:
        out = jax.lax.map(one_chunk, xs)
    # [n_ch, B, Gh, c, rr, bq, D] -> [B, n_ch, c, bq, Gh, rr, D]
    out = out.transpose(1, 0, 3, 5, 2, 4, 6).reshape(b, n_q * bq, h, d)
    return out[:, :t].astype(q_BTHD.dtype)
