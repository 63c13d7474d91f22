"""The specification of sparse decode attention: the selected token/page indices expanded to a dense
[B, H, S] mask over the KV cache (AND slot < length), then a dense masked fp32 softmax. O(S) per
query; the tests compare the XLA gather path and the Pallas kernel against it."""

from __future__ import annotations

import jax.numpy as jnp


def selected_mask(indices_BHsK, counts_BHs, *, s: int, page_size: int = 1, lengths_B=None):
    """[Bi, Hs, S] bool (Bi = B if lengths_B is given, else the indices' batch): slot allowed.

    Entry e of row (b, hs) is live when e < counts[b, hs]; it names the cache slots
    [idx * page_size, (idx + 1) * page_size). Out-of-range indices select nothing.
    """
    idx = jnp.asarray(indices_BHsK, jnp.int32)
    bi, hs, k = idx.shape
    n_pages = s // page_size
    live_e = jnp.arange(k)[None, None, :] < jnp.asarray(counts_BHs, jnp.int32)[:, :, None]
    # Dead entries scatter to an out-of-range page, which mode="drop" discards.
    target = jnp.where(live_e & (idx >= 0), idx, n_pages)
    pages = jnp.zeros((bi, hs, n_pages), bool)
    bb = jnp.arange(bi)[:, None, None]
    hh = jnp.arange(hs)[None, :, None]
    pages = pages.at[bb, hh, target].set(True, mode="drop")
    mask = jnp.repeat(pages, page_size, axis=-1)
    if lengths_B is not None:
        valid = jnp.arange(s)[None, :] < jnp.asarray(lengths_B, jnp.int32)[:, None]
        mask = mask & valid[:, None, :]
    return mask


def decode_reference(
    q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, *,
    page_size=1, lengths_B=None, scale=None, softcap=None,
):
    """out [B, H, D]: softmax over the allowed cache slots; a row with no allowed slot gives 0."""
    b, h, d = q_BHD.shape
    s, g = k_cache_BSGD.shape[1], k_cache_BSGD.shape[2]
    r = h // g
    scale = d**-0.5 if scale is None else scale
    mask = selected_mask(indices_BHsK, counts_BHs, s=s, page_size=page_size, lengths_B=lengths_B)
    mask_BHS = jnp.broadcast_to(mask, (b, h, s))  # Hs = 1 broadcasts over heads, Bi = 1 over batch
    q = q_BHD.astype(jnp.float32).reshape(b, g, r, d)
    k = k_cache_BSGD.astype(jnp.float32)
    v = v_cache_BSGD.astype(jnp.float32)
    logits = jnp.einsum("bgrd,bsgd->bgrs", q, k, precision="highest").reshape(b, h, s) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask_BHS, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    out = jnp.einsum("bgrs,bsgd->bgrd", p.reshape(b, g, r, s), v, precision="highest")
    return out.reshape(b, h, d).astype(q_BHD.dtype)
