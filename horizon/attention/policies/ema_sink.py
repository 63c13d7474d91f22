"""EMA sinks plus a sliding window (Reward Forcing, 2025: the sink tokens are updated by an
exponential moving average of the tokens evicted from the window, so the sink summarizes the
whole past instead of freezing the first frames)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from horizon.attention.selection import (
    Selection,
    as_positions,
    build_self,
    first_row_values,
    is_static,
    window_block_bound,
    xp_of,
)
from horizon.errors import ConfigError, ShapeError

_INVISIBLE = np.int32(2**30)


def ema_sink(
    positions,
    segment_ids=None,
    *,
    k_BSGD,
    v_BSGD,
    window: int,
    n_sinks: int = 4,
    alpha: float = 0.9,
    block_q: int = 64,
    block_k: int = 64,
) -> Selection:
    """Sliding window plus n_sinks EMA sink rows per query block, in parallel (prefill) form.

    Definition (per document, at query-block granularity). Let p0 be the position of query
    block i's first row and L = p0 - window + 1 the first position still in that row's window.
    The tokens evicted for block i are those of its document with n_sinks <= position < L. Sink
    slot j starts as the key/value at position j and takes the evicted tokens with position = j
    (mod n_sinks) in position order, each by S_j <- alpha * S_j + (1 - alpha) * x (keys and
    values alike). Block i's rows (same document, positions p0 .. p0 + block_q - 1) attend the
    window and these n_sinks rows; the rows exist only once L > 0 (position 0 has left the
    window). Main keys are masked by the window alone (no raw sinks).

    k_BSGD, v_BSGD: [B, S, G, D] keys/values (S = T); positions [B, T] or an int T.
    """
    if window <= 0 or n_sinks <= 0 or not 0.0 <= alpha < 1.0:
        raise ConfigError(
            f"ema_sink: window={window} and n_sinks={n_sinks} must be positive, alpha={alpha} in [0, 1)"
        )
    pos, seg = as_positions(positions, segment_ids)
    t = pos.shape[1]
    if k_BSGD.shape[1] != t or v_BSGD.shape != k_BSGD.shape:
        raise ShapeError(
            f"ema_sink: k_BSGD {tuple(k_BSGD.shape)} and v_BSGD {tuple(v_BSGD.shape)} must be [B, T={t}, G, D]"
        )
    xp = xp_of(pos, seg)
    p0 = first_row_values(pos, block_q)  # [Bs, nQ]
    n_q = p0.shape[1]
    first_rows = np.arange(n_q) * block_q
    lim = p0 - window + 1  # [Bs, nQ]
    seg0 = None if seg is None else first_row_values(seg, block_q)
    ek, ev = _ema_states(k_BSGD, v_BSGD, pos, seg, first_rows, p0, lim, n_sinks, alpha, block_q)
    visible_from = xp.where(lim > 0, p0, _INVISIBLE).astype(np.int32)
    extra_pos = xp.repeat(visible_from, n_sinks, axis=1)  # [Bs, nQ * n_sinks]
    extra_seg = None if seg0 is None else xp.repeat(seg0, n_sinks, axis=1)
    bound = None
    if not is_static(pos, seg):
        bound = window_block_bound(window, block_q, block_k) + 2
    return build_self(
        pos,
        seg,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        window=window,
        extra_k=ek,
        extra_v=ev,
        extra_positions=extra_pos,
        extra_segment_ids=extra_seg,
        extra_span=block_q,
        max_blocks=bound,
    )


def _ema_states(k, v, pos, seg, first_rows, p0, lim, n, alpha, block_q):
    """[B, nQ * n, G, D] sink keys and values, by a scan over query blocks.

    Between consecutive blocks of one document the eviction limit advances by block_q, so step i
    folds in the block_q tokens at rows [r_i - window + 1 - block_q, r_i - window + 1); a new
    document restarts from its first n tokens.
    """
    b, t = k.shape[:2]
    pos, lim, p0 = jnp.asarray(pos), jnp.asarray(lim), jnp.asarray(p0)
    seg = jnp.zeros_like(pos) if seg is None else jnp.asarray(seg)
    pos, seg = jnp.broadcast_to(pos, (b, t)), jnp.broadcast_to(seg, (b, t))
    lim = jnp.broadcast_to(lim, (b, lim.shape[1]))
    p0 = jnp.broadcast_to(p0, (b, p0.shape[1]))
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    take = jax.vmap(lambda x, i: x[i])  # per batch row

    def step(carry, xs):
        sk, sv, prev_seg = carry
        r, pi, li = xs  # first row index (static per step), its position, its limit: [B]
        doc_start = r - pi  # row index of the document's first token
        sg = take(seg, jnp.clip(jnp.broadcast_to(r, (b,)), 0, t - 1))
        init_rows = jnp.clip(doc_start[:, None] + jnp.arange(n), 0, t - 1)  # [B, n]
        fresh = sg != prev_seg
        sk = jnp.where(fresh[:, None, None, None], take(kf, init_rows), sk)
        sv = jnp.where(fresh[:, None, None, None], take(vf, init_rows), sv)
        # Rows evicted at this step: the block_q rows ending at the limit, doc rows with pos >= n.
        rows = doc_start[:, None] + li[:, None] - block_q + jnp.arange(block_q)  # [B, bq]
        rows_c = jnp.clip(rows, 0, t - 1)
        rpos, rseg = take(pos, rows_c), take(seg, rows_c)
        ok = (rows >= 0) & (rows < t) & (rseg == sg[:, None]) & (rpos >= n) & (rpos < li[:, None])
        slot = jax.nn.one_hot(rpos % n, n, dtype=jnp.float32) * ok[..., None]  # [B, bq, n]
        # Tokens of one slot enter in position order: weight alpha^(number entering after it).
        later = jnp.flip(jnp.cumsum(jnp.flip(slot, 1), 1), 1) - slot
        w = (1.0 - alpha) * alpha**later * slot  # [B, bq, n]
        decay = alpha ** slot.sum(1)  # [B, n]
        sk = decay[:, :, None, None] * sk + jnp.einsum("btn,btgd->bngd", w, take(kf, rows_c))
        sv = decay[:, :, None, None] * sv + jnp.einsum("btn,btgd->bngd", w, take(vf, rows_c))
        return (sk, sv, sg), (sk, sv)

    g, d = k.shape[2:]
    init = (
        jnp.zeros((b, n, g, d), jnp.float32),
        jnp.zeros((b, n, g, d), jnp.float32),
        jnp.full((b,), -(2**30), jnp.int32),
    )
    xs = (jnp.asarray(first_rows, jnp.int32), p0.T, lim.T)
    _, (ks, vs) = jax.lax.scan(step, init, xs)  # [nQ, B, n, G, D]
    ks = jnp.moveaxis(ks, 0, 1).reshape(b, -1, g, d).astype(k.dtype)
    vs = jnp.moveaxis(vs, 0, 1).reshape(b, -1, g, d).astype(v.dtype)
    return ks, vs
