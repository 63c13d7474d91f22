"""Sparse decode attention in XLA: gather only the selected cache slots (K * page_size per row), then
a masked fp32 softmax over them. The CPU path; its cost is O(K * page_size), not O(S)."""

from __future__ import annotations

import jax.numpy as jnp


def selected_tokens(indices_BHsK, counts_BHs, *, s: int, page_size: int, lengths_B):
    """(tok [B, Hs, K * page_size] clamped slot indices, live [B, Hs, K * page_size] bool)."""
    idx = jnp.asarray(indices_BHsK, jnp.int32)
    b = lengths_B.shape[0]
    idx = jnp.broadcast_to(idx, (b,) + idx.shape[1:])
    counts = jnp.broadcast_to(jnp.asarray(counts_BHs, jnp.int32), idx.shape[:2])
    k = idx.shape[-1]
    tok = (idx[..., None] * page_size + jnp.arange(page_size)).reshape(idx.shape[:2] + (k * page_size,))
    entry = jnp.arange(k * page_size) // page_size
    live = (entry[None, None, :] < counts[:, :, None]) & (tok >= 0)
    live = live & (tok < jnp.asarray(lengths_B, jnp.int32)[:, None, None])
    return jnp.clip(tok, 0, s - 1), live


def decode_xla(
    q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, *,
    page_size=1, lengths_B=None, scale=None, softcap=None,
):
    """Same contract as reference.decode_reference (indices distinct within a row)."""
    b, h, d = q_BHD.shape
    s, g = k_cache_BSGD.shape[1], k_cache_BSGD.shape[2]
    r = h // g
    hs = indices_BHsK.shape[1]
    scale = d**-0.5 if scale is None else scale
    lengths = jnp.full((b,), s, jnp.int32) if lengths_B is None else lengths_B
    tok, live = selected_tokens(indices_BHsK, counts_BHs, s=s, page_size=page_size, lengths_B=lengths)
    # Row groups: shared indices -> one row group per kv head (R query heads each);
    # per-head indices -> one row group per query head (1 query head each).
    nh, rows = (g, r) if hs == 1 else (h, 1)
    kv_of = jnp.arange(nh) if hs == 1 else jnp.arange(h) // r
    tok = jnp.broadcast_to(tok, (b, nh, tok.shape[-1]))
    live = jnp.broadcast_to(live, tok.shape)
    bb = jnp.arange(b)[:, None, None]
    k_sel = k_cache_BSGD[bb, tok, kv_of[None, :, None]]  # [B, NH, N, D]
    v_sel = v_cache_BSGD[bb, tok, kv_of[None, :, None]]
    q = q_BHD.reshape(b, nh, rows, d)
    logits = jnp.einsum(
        "bnrd,bnkd->bnrk", q, k_sel, preferred_element_type=jnp.float32, precision="highest"
    ) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(live[:, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bnrk,bnkd->bnrd", p.astype(v_sel.dtype), v_sel,
        preferred_element_type=jnp.float32, precision="highest",
    )
    out = out / jnp.where(l == 0.0, 1.0, l)
    return out.reshape(b, h, d).astype(q_BHD.dtype)
