"""Landmark attention's grouped softmax (Mohtashami & Jaggi, Landmark Attention: Random-Access
Infinite Context Length for Transformers, 2023), a variant of the block-sparse kernel: the keys
are cut into blocks of `block` tokens, each block has one landmark key (in training, the key of
a landmark token inserted after the block), and a query's weight on a key of an earlier block is
its block's landmark weight times the key's softmax within its block (Sec. 3.1, eq. 2-3):

  query i in block c = i // block; the "current" group holds the keys j <= i of block c and the
  landmarks l_b of the earlier blocks b < c (those the query may use); w = softmax over it;
  a_ij = w_j                                for j in block c, j <= i
  a_ij = w_{l_b} * softmax_{j' in b}(s_ij') for j in block b < c
  landmarks carry no value: out_i = sum_j a_ij v_j.

At inference (Sec. 3.2) each query keeps only its top-k blocks by landmark score; here retrieval
is per query block and head (`retrieve`, the score of a block is the best q . l_b over the query
block's rows), so the retrieved blocks form a Selection and `landmark_xla` gathers only them.

Here: the dense reference, the XLA gather path over a Selection, and the retrieval. Not here: a
Pallas kernel, the model wiring (inserting landmark tokens, config), landmark rows as queries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.errors import KernelInputError
from kernels.sparse_attention.selection import Selection, tables_from_masks

# Masked logits in the gather path: finite, so rows or blocks with nothing live keep finite
# gradients (their weights are multiplied by an exact 0 gate), yet exp(_NEG - z) == 0.
_NEG = -1e30


def _check(q_BTHD, k_BSGD, v_BSGD, lk_BNGD, block):
    b, t, h, d = q_BTHD.shape
    if k_BSGD.shape != v_BSGD.shape or k_BSGD.shape[:2] != (b, t) or k_BSGD.shape[3] != d:
        raise KernelInputError(
            f"landmark: k {k_BSGD.shape} / v {v_BSGD.shape} must be [B, T, G, D] matching q {q_BTHD.shape} "
            "(self-attention over the regular tokens)")
    g = k_BSGD.shape[2]
    if h % g:
        raise KernelInputError(f"landmark: kv heads {g} do not divide query heads {h}")
    n = math.ceil(t / block)
    if lk_BNGD.shape != (b, n, g, d):
        raise KernelInputError(
            f"landmark: landmark keys {lk_BNGD.shape} must be [B, ceil(T / block) = {n}, G, D]: one per block")
    return b, t, h, d, g, n


def landmark_reference(q_BTHD, k_BSGD, v_BSGD, lk_BNGD, *, block: int, live=None, scale=None):
    """The grouped softmax, dense: [B, T, H, D] float32.

    q_BTHD [B, T, H, D]; k_BSGD, v_BSGD [B, T, G, D] (key index = query index = position);
    lk_BNGD [B, ceil(T / block), G, D] landmark keys; live [Bs, Hs, nQ, N] bool or None: the earlier
    blocks each query block may retrieve (None: all, the training-time attention).
    """
    b, t, h, d, g, n = _check(q_BTHD, k_BSGD, v_BSGD, lk_BNGD, block)
    scale = d**-0.5 if scale is None else scale
    rep = lambda x: jnp.repeat(x.astype(jnp.float32), h // g, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), rep(k_BSGD)) * scale  # [B, H, T, S]
    ls = jnp.einsum("bthd,bnhd->bhtn", q_BTHD.astype(jnp.float32), rep(lk_BNGD)) * scale  # [B, H, T, N]
    qb = np.arange(t) // block  # block of each query / key
    same = (qb[:, None] == qb[None, :]) & (np.arange(t)[:, None] >= np.arange(t)[None, :])  # [T, S]
    earlier = np.arange(n)[None, :] < qb[:, None]  # [T, N] landmark b < c
    use = jnp.asarray(earlier)[None, None]
    if live is not None:
        use = use & jnp.repeat(jnp.asarray(live, bool), block, axis=2)[:, :, :t]
    cur = jnp.where(same, s, -jnp.inf)
    lm = jnp.where(use, ls, -jnp.inf)
    z = jax.nn.logsumexp(jnp.concatenate([cur, lm], -1), axis=-1, keepdims=True)  # the group's normaliser
    # Softmax of each key within its block: pad keys to N * block with -inf.
    sp = jnp.pad(s, [(0, 0), (0, 0), (0, 0), (0, n * block - t)], constant_values=-jnp.inf)
    within = jax.nn.softmax(sp.reshape(b, h, t, n, block), axis=-1).reshape(b, h, t, n * block)[..., :t]
    gate = jnp.repeat(jnp.exp(lm - z), block, axis=-1)[..., :t]  # landmark weight of each key's block
    a = jnp.exp(cur - z) + gate * within  # gate is 0 where the block is not earlier or not live
    return jnp.einsum("bhts,bshd->bthd", a, rep(v_BSGD))


def landmark_xla(q_BTHD, k_BSGD, v_BSGD, lk_BNGD, sel: Selection, *, scale=None):
    """The grouped softmax over the blocks a Selection lists: [B, T, H, D] float32.

    sel: block_q == block_k == block; kv_blocks [Bs, Hs, nQ, Kmax] (Hs = 1 or H), entries
    [:counts] per query block i: the retrieved earlier blocks (gated by their landmarks); the
    current block i is always attended (causally, ungated), listed or not; later blocks are
    ignored. Equals landmark_reference(live = the listed blocks); cost O(T * Kmax * block)
    instead of O(T^2). Differentiable by autodiff (no custom backward).
    """
    if sel.block_q != sel.block_k:
        raise KernelInputError(f"landmark: block_q={sel.block_q} must equal block_k={sel.block_k}")
    block = sel.block_q
    b, t, h, d, g, n = _check(q_BTHD, k_BSGD, v_BSGD, lk_BNGD, block)
    if sel.kv_blocks.shape[2] != n:
        raise KernelInputError(f"landmark: selection has {sel.kv_blocks.shape[2]} query blocks, q needs {n}")
    scale = d**-0.5 if scale is None else scale
    tp = n * block
    pad = lambda x: jnp.pad(x.astype(jnp.float32), [(0, 0), (0, tp - t), (0, 0), (0, 0)])
    hg = np.arange(h) // (h // g)  # kv head of each query head
    qb = pad(q_BTHD).reshape(b, n, block, h, d)
    kb = pad(k_BSGD)[:, :, hg].reshape(b, n, block, h, d)  # [B, N, blk, H, D]
    vb = pad(v_BSGD)[:, :, hg].reshape(b, n, block, h, d)
    lk = lk_BNGD.astype(jnp.float32)[:, :, hg]  # [B, N, H, D]
    kv = jnp.broadcast_to(jnp.asarray(sel.kv_blocks, jnp.int32), (b, h, n, sel.kv_blocks.shape[-1]))
    cnt = jnp.broadcast_to(jnp.asarray(sel.counts, jnp.int32), (b, h, n))
    kmax = kv.shape[-1]
    slot_ok = jnp.arange(kmax)[None, None, None, :] < cnt[..., None]
    is_past = slot_ok & (kv < jnp.arange(n)[None, None, :, None])  # [B, H, nQ, Kmax]
    # The current block: causal scores within the diagonal block, always attended.
    idx = jnp.arange(tp).reshape(n, block)
    diag_ok = (idx[:, :, None] >= idx[:, None, :]) & (idx[:, None, :] < t)  # [nQ, blk(q), blk(k)]
    s_cur = jnp.einsum("bqrhd,bqchd->bhqrc", qb, kb) * scale
    cur = jnp.where(diag_ok, s_cur, _NEG)  # [B, H, nQ, blk(q), blk(k)]
    # Retrieved earlier blocks, gathered per (batch, head, query block, slot).
    bi, hi = jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None]
    kg, vg, lg = kb[bi, kv, :, hi], vb[bi, kv, :, hi], lk[bi, kv, hi]  # [B, H, nQ, Kmax, blk, D], [.., D]
    s = jnp.einsum("bqrhd,bhqkcd->bhqrkc", qb, kg) * scale  # [B, H, nQ, blk(q), Kmax, blk(k)]
    ls = jnp.einsum("bqrhd,bhqkd->bhqrk", qb, lg) * scale  # [B, H, nQ, blk(q), Kmax]
    real = (kv[:, :, :, None, :, None] * block + jnp.arange(block)) < t
    lm = jnp.where(is_past[:, :, :, None, :], ls, _NEG)
    z = jax.nn.logsumexp(jnp.concatenate([cur, lm], -1), axis=-1)  # the group's normaliser; the diagonal is live
    past = jnp.where(is_past[:, :, :, None, :, None] & real, s, _NEG)
    within = jax.nn.softmax(past, axis=-1)  # a retrieved block holds >= 1 real key
    gate = jnp.exp(lm - z[..., None])  # exactly 0 for slots that are not retrieved earlier blocks
    out = jnp.einsum("bhqrc,bqchd->bqrhd", jnp.exp(cur - z[..., None]), vb)
    out = out + jnp.einsum("bhqrkc,bhqkcd->bqrhd", gate[..., None] * within, vg)  # [B, nQ, blk, H, D]
    return out.reshape(b, tp, h, d)[:, :t]


def retrieve(q_BTHD, lk_BNGD, *, block: int, k: int) -> Selection:
    """Per head and query block: the current block plus the top-`k` earlier blocks by landmark
    score, max over the query block's rows of q . l_b (Sec. 3.2's retrieval, at block
    granularity so the kernel can gather whole blocks). A Selection over positions 0..T-1."""
    if k < 0 or block <= 0:
        raise KernelInputError(f"landmark.retrieve: k={k} must be >= 0 and block={block} positive")
    b, t, h, d = q_BTHD.shape
    n, g = lk_BNGD.shape[1], lk_BNGD.shape[2]
    if n != math.ceil(t / block) or h % g:
        raise KernelInputError(f"landmark.retrieve: landmarks {lk_BNGD.shape} do not match q {q_BTHD.shape}")
    q = jnp.pad(jax.lax.stop_gradient(q_BTHD).astype(jnp.float32), [(0, 0), (0, n * block - t), (0, 0), (0, 0)])
    q = q.reshape(b, n, block, h, d)
    lk = jnp.repeat(jax.lax.stop_gradient(lk_BNGD).astype(jnp.float32), h // g, axis=2)
    score = jnp.einsum("bqrhd,bnhd->bhqrn", q, lk)
    row_ok = (np.arange(n * block) < t).reshape(n, block)[None, None, :, :, None]
    score = jnp.where(row_ok, score, -jnp.inf).max(3)  # [B, H, nQ, N]
    earlier = jnp.asarray(np.arange(n)[None, :] < np.arange(n)[:, None])
    score = jnp.where(earlier, score, -jnp.inf)
    picked = jnp.zeros(score.shape, bool)
    if k > 0 and n > 1:
        val, idx = jax.lax.top_k(score, min(k, n))
        picked = jnp.any(jax.nn.one_hot(idx, n, dtype=bool) & (val > -jnp.inf)[..., None], axis=-2)
    live = picked | jnp.eye(n, dtype=bool)
    kv_blocks, counts, full_counts = tables_from_masks(live, jnp.zeros_like(live), min(n, k + 1))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return Selection(kv_blocks=kv_blocks, counts=counts, full_counts=full_counts, q_positions=pos,
                     k_positions=pos, block_q=block, block_k=block, causal=True)
