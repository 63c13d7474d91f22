"""Pieces every decode-time selector shares: the forced sinks + local window, per-kv-group vote
scores, compaction of live entries to the front of an index list, and static-option checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError, ShapeError


def check_nonneg(name: str, **opts) -> None:
    """ConfigError if an int option is negative or not an int."""
    for k, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"selector {name!r}: {k}={v!r} must be a non-negative int")


def check_positive(name: str, **opts) -> None:
    """ConfigError if an int option is not a positive int."""
    for k, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"selector {name!r}: {k}={v!r} must be a positive int")


def check_shapes(name: str, q_BHD, k_cache_BSGD, lengths_B) -> tuple[int, int, int, int, int]:
    """(B, H, S, G, D) after checking q, the key cache and lengths agree (ShapeError if not)."""
    if q_BHD.ndim != 3 or k_cache_BSGD.ndim != 4 or lengths_B.ndim != 1:
        raise ShapeError(
            f"{name}.select: want q_BHD [B,H,D], k_cache_BSGD [B,S,G,D], lengths_B [B]; got "
            f"{tuple(q_BHD.shape)}, {tuple(k_cache_BSGD.shape)}, {tuple(lengths_B.shape)}"
        )
    b, h, d = q_BHD.shape
    bk, s, g, dk = k_cache_BSGD.shape
    if bk != b or dk != d or lengths_B.shape[0] != b or h % g:
        raise ShapeError(
            f"{name}.select: q_BHD {tuple(q_BHD.shape)}, k_cache_BSGD {tuple(k_cache_BSGD.shape)} and "
            f"lengths_B {tuple(lengths_B.shape)} disagree (batch, head dim, or H not a multiple of G)"
        )
    return b, h, s, g, d


def forced_tokens(lengths_B, *, s: int, window: int, n_sinks: int):
    """The slots every selector keeps (StreamingLLM's sinks + the local window).

    Returns (idx [B, n_sinks + window] int32, live bool): the first n_sinks slots and the last
    `window` slots of [0, length); live entries are distinct (window slots below n_sinks are dead).
    """
    lengths = jnp.asarray(lengths_B, jnp.int32)[:, None]
    sinks = jnp.broadcast_to(jnp.arange(n_sinks, dtype=jnp.int32), (lengths.shape[0], n_sinks))
    recent = lengths - window + jnp.arange(window, dtype=jnp.int32)
    idx = jnp.concatenate([sinks, recent], -1)
    live = jnp.concatenate([sinks < lengths, recent >= n_sinks], -1) & (idx >= 0) & (idx < lengths)
    return jnp.clip(idx, 0, s - 1), live


def forced_mask(lengths_B, *, s: int, window: int, n_sinks: int):
    """[B, S] bool: slot is a sink or in the local window (the slots top-k must not pick again)."""
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    lengths = jnp.asarray(lengths_B, jnp.int32)[:, None]
    return (pos < n_sinks) | (pos >= lengths - window)


def group_vote(q_BHD, k_cache_BSGD, lengths_B, *, scale: float | None = None):
    """[B, G, S] TokenSelect's per-head soft vote: softmax_s(q_h . k_s) per query head over the live
    slots [0, length), summed over the R query heads of each kv group (0 on empty slots)."""
    b, h, d = q_BHD.shape
    s, g = k_cache_BSGD.shape[1], k_cache_BSGD.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q_BHD.astype(jnp.float32).reshape(b, g, h // g, d)
    logits = jnp.einsum("bgrd,bsgd->bgrs", q, k_cache_BSGD.astype(jnp.float32)) * scale
    valid = jnp.arange(s)[None, :] < jnp.asarray(lengths_B, jnp.int32)[:, None]  # [B, S]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1).sum(2)


def topk_tokens(scores_BGS, allowed_BS, k: int):
    """(idx [B, G, k], live [B, G, k]): the k highest-scoring allowed slots per row (live = allowed)."""
    masked = jnp.where(allowed_BS[:, None, :], scores_BGS, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)
    live = jnp.take_along_axis(jnp.broadcast_to(allowed_BS[:, None, :], masked.shape), idx, -1)
    return idx.astype(jnp.int32), live


def compact(idx, live):
    """(indices, counts): live entries moved to the front in order (the decode_attend contract:
    entries [0, count) are live), dead entries set to 0. idx, live [..., K]; counts [...]."""
    order = jnp.argsort(~live, axis=-1, stable=True)
    idx = jnp.take_along_axis(idx, order, -1)
    live = jnp.take_along_axis(live, order, -1)
    return jnp.where(live, idx, 0).astype(jnp.int32), live.sum(-1).astype(jnp.int32)


def to_heads(x_BG, h: int):
    """Repeat a per-kv-group array [B, G, ...] to per-query-head [B, H, ...] (group g serves heads
    g*R .. g*R+R-1, the GQA layout decode_attend uses)."""
    return jnp.repeat(x_BG, h // x_BG.shape[1], axis=1)
