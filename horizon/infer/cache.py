"""Preallocated KV caches for one attention layer, as pytrees: full (capacity S, keys after RoPE at
absolute positions); window + sinks ring buffer (StreamingLLM, Xiao et al., 2023, Sec. 3.2: keys
stored before RoPE and rotated at their position in the cache); EMA sinks (Reward Forcing, 2025:
sink rows are an exponential moving average of the tokens evicted from the window); paged (pages of
`page_size` slots with a per-page key summary: mean, and per-dim min / max as in Quest, Tang et al.,
2024). Every cache knows its tokens written per row (`length`); `cache_bytes` sums any cache's bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from horizon.errors import ShapeError


@struct.dataclass
class FullCache:
    k: jax.Array  # [B, S, G, D] after RoPE, slot = absolute position
    v: jax.Array  # [B, S, G, D]
    length: jax.Array  # [B] int32: tokens written (= the next token's position)


@struct.dataclass
class StreamingCache:
    """Slots [0, n_sinks): the first n_sinks tokens, kept forever; slots [n_sinks, C): a ring of the
    last C - n_sinks tokens (token t >= n_sinks lives in slot n_sinks + (t - n_sinks) % window)."""

    k: jax.Array  # [B, C, G, D] BEFORE RoPE
    v: jax.Array
    length: jax.Array  # [B] int32 tokens seen by the stream (not bounded by C)
    n_sinks: int = struct.field(pytree_node=False)


@struct.dataclass
class EmaSinkCache:
    """Slots [0, n_sinks): EMA sink rows; slots [n_sinks, C): a ring of the last window = C - n_sinks
    tokens (position t in slot n_sinks + t % window). Keys after RoPE at absolute positions, as the
    prefill policy horizon.attention.policies.ema_sink takes them."""

    k: jax.Array  # [B, C, G, D]
    v: jax.Array
    length: jax.Array  # [B] int32 tokens seen
    n_sinks: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)


@struct.dataclass
class PagedCache:
    k: jax.Array  # [B, S, G, D] after RoPE; page p = slots [p * page_size, (p + 1) * page_size)
    v: jax.Array
    length: jax.Array  # [B] int32
    k_mean: jax.Array  # [B, S / page_size, G, D] float32 over the page's written slots (0 if none)
    k_min: jax.Array  # [B, S / page_size, G, D] float32 (+inf where the page is empty)
    k_max: jax.Array  # [B, S / page_size, G, D] float32 (-inf where the page is empty)
    page_size: int = struct.field(pytree_node=False)


KVCache = FullCache | StreamingCache | EmaSinkCache | PagedCache
KINDS = {"full": FullCache, "streaming": StreamingCache, "ema_sink": EmaSinkCache, "paged": PagedCache}


def cache_bytes(cache) -> int:
    """Bytes held by a cache (or any pytree of caches): the sum of its leaves' nbytes."""
    return int(sum(x.nbytes for x in jax.tree.leaves(cache)))


def init_cache(kind: str, *, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
               n_sinks: int = 0, page_size: int = 1, alpha: float = 0.9) -> KVCache:
    """An empty cache of `capacity` slots (paged: rounded up to whole pages)."""
    def zeros(s):
        return jnp.zeros((batch, s, kv_heads, head_dim), dtype)

    length = jnp.zeros((batch,), jnp.int32)
    if kind == "full":
        return FullCache(zeros(capacity), zeros(capacity), length)
    if kind == "streaming":
        return StreamingCache(zeros(capacity), zeros(capacity), length, n_sinks=n_sinks)
    if kind == "ema_sink":
        return EmaSinkCache(zeros(capacity), zeros(capacity), length, n_sinks=n_sinks, alpha=float(alpha))
    if kind == "paged":
        n_pages = -(-capacity // page_size)
        shape = (batch, n_pages, kv_heads, head_dim)
        return PagedCache(zeros(n_pages * page_size), zeros(n_pages * page_size), length,
                          jnp.zeros(shape, jnp.float32), jnp.full(shape, jnp.inf, jnp.float32),
                          jnp.full(shape, -jnp.inf, jnp.float32), page_size=page_size)
    raise ShapeError(f"cache kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")


def capacity(cache: KVCache) -> int:
    return int(cache.k.shape[1])


def stores_rotated(cache: KVCache) -> bool:
    """True when keys are stored after RoPE at absolute positions (all but the StreamingLLM ring)."""
    return not isinstance(cache, StreamingCache)


# ---------------------------------------------------------------------------------------- writing


def _rows(b):
    return jnp.arange(b)[:, None]


def _stream_slot(t, n_sinks, window):
    return jnp.where(t < n_sinks, t, n_sinks + (t - n_sinks) % window)


def fill(cache: KVCache, k_BPGD, v_BPGD, lengths_B) -> KVCache:
    """The cache after a prompt: column j of k_BPGD / v_BPGD is position j, live where j < lengths_B
    (keys rotated or not as `stores_rotated(cache)` says). The cache must be empty."""
    b, p = k_BPGD.shape[:2]
    s = capacity(cache)
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    t_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    live = t_BP < lengths_B[:, None]
    k_BPGD, v_BPGD = k_BPGD.astype(cache.k.dtype), v_BPGD.astype(cache.v.dtype)
    if isinstance(cache, (FullCache, PagedCache)):
        slot = jnp.where(live, t_BP, s)  # out of range: dropped
        k = cache.k.at[_rows(b), slot].set(k_BPGD, mode="drop")
        v = cache.v.at[_rows(b), slot].set(v_BPGD, mode="drop")
        if isinstance(cache, FullCache):
            return FullCache(k, v, lengths_B)
        return _with_summaries(PagedCache(k, v, lengths_B, cache.k_mean, cache.k_min, cache.k_max,
                                          page_size=cache.page_size))
    n = cache.n_sinks
    w = s - n
    if isinstance(cache, StreamingCache):
        keep = live & ((t_BP < n) | (t_BP >= lengths_B[:, None] - w))
        slot = jnp.where(keep, _stream_slot(t_BP, n, w), s)
        k = cache.k.at[_rows(b), slot].set(k_BPGD, mode="drop")
        v = cache.v.at[_rows(b), slot].set(v_BPGD, mode="drop")
        return StreamingCache(k, v, lengths_B, n_sinks=n)
    # EMA sinks: the ring keeps the last w tokens; sink j starts at token j and folds in, in
    # position order, every evicted token t >= n with t = j (mod n).
    keep = live & (t_BP >= lengths_B[:, None] - w)
    slot = jnp.where(keep, n + t_BP % w, s)
    k = cache.k.at[_rows(b), slot].set(k_BPGD, mode="drop")
    v = cache.v.at[_rows(b), slot].set(v_BPGD, mode="drop")
    a = cache.alpha
    evicted = live & (t_BP >= n) & (t_BP < lengths_B[:, None] - w)
    onehot = jax.nn.one_hot(t_BP % n, n, dtype=jnp.float32) * evicted[..., None]  # [B, P, n]
    later = jnp.flip(jnp.cumsum(jnp.flip(onehot, 1), 1), 1) - onehot  # evicted after t in its slot
    weight = (1.0 - a) * a**later * onehot
    started = jnp.arange(n)[None, :] < lengths_B[:, None]  # sink j exists once token j was seen
    decay = a ** onehot.sum(1)  # [B, n]
    sinks = []
    for x in (k_BPGD, v_BPGD):
        xf = x.astype(jnp.float32)
        first = jnp.zeros((b, n) + x.shape[2:], jnp.float32).at[:, :min(p, n)].set(xf[:, :n])
        first = jnp.where(started[..., None, None], first, 0.0)
        sinks.append(decay[..., None, None] * first + jnp.einsum("bpn,bpgd->bngd", weight, xf))
    k = k.at[:, :n].set(sinks[0].astype(k.dtype))
    v = v.at[:, :n].set(sinks[1].astype(v.dtype))
    return EmaSinkCache(k, v, lengths_B, n_sinks=n, alpha=a)


def append(cache: KVCache, k_BGD, v_BGD) -> KVCache:
    """The cache with one more token per row (its key rotated or not as `stores_rotated` says)."""
    b = k_BGD.shape[0]
    s = capacity(cache)
    pos = cache.length
    k_BGD, v_BGD = k_BGD.astype(cache.k.dtype), v_BGD.astype(cache.v.dtype)
    rows = jnp.arange(b)
    if isinstance(cache, (FullCache, PagedCache)):
        slot = jnp.where(pos < s, pos, s)  # a full cache drops what does not fit (callers check first)
        k = cache.k.at[rows, slot].set(k_BGD, mode="drop")
        v = cache.v.at[rows, slot].set(v_BGD, mode="drop")
        if isinstance(cache, FullCache):
            return FullCache(k, v, pos + 1)
        return _update_page(PagedCache(k, v, pos + 1, cache.k_mean, cache.k_min, cache.k_max,
                                       page_size=cache.page_size), pos)
    n = cache.n_sinks
    w = s - n
    if isinstance(cache, StreamingCache):
        slot = _stream_slot(pos, n, w)
        k = cache.k.at[rows, slot].set(k_BGD)
        v = cache.v.at[rows, slot].set(v_BGD)
        return StreamingCache(k, v, pos + 1, n_sinks=n)
    slot = n + pos % w
    a = cache.alpha
    old = pos - w  # the token this write evicts from the ring (if >= 0)
    k, v = cache.k, cache.v
    fold = (old >= n)[:, None, None]
    sink = jnp.where(old >= n, old % n, 0)
    outs = []
    for arr, new in ((k, k_BGD), (v, v_BGD)):
        evicted = arr[rows, slot].astype(jnp.float32)
        cur = arr[rows, sink].astype(jnp.float32)
        folded = jnp.where(fold, a * cur + (1.0 - a) * evicted, cur)
        arr = arr.at[rows, sink].set(folded.astype(arr.dtype))
        # a token j < n also starts sink j (EMA initialisation)
        arr = arr.at[rows, jnp.where(pos < n, pos, s)].set(new, mode="drop")
        outs.append(arr.at[rows, slot].set(new))
    return EmaSinkCache(outs[0], outs[1], pos + 1, n_sinks=n, alpha=a)


def append_many(cache: KVCache, k_BTGD, v_BTGD) -> KVCache:
    """A full or paged cache with T more tokens per row, at positions length .. length + T - 1, in
    one scatter (streaming caches evict as they go: append them one token at a time)."""
    if not isinstance(cache, (FullCache, PagedCache)):
        raise ShapeError(f"append_many: {type(cache).__name__} evicts as it goes; use append per token")
    b, t = k_BTGD.shape[:2]
    s = capacity(cache)
    slot = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)
    slot = jnp.where(slot < s, slot, s)  # what does not fit is dropped (callers check first)
    k = cache.k.at[_rows(b), slot].set(k_BTGD.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[_rows(b), slot].set(v_BTGD.astype(cache.v.dtype), mode="drop")
    length = cache.length + t
    if isinstance(cache, FullCache):
        return FullCache(k, v, length)
    return _with_summaries(PagedCache(k, v, length, cache.k_mean, cache.k_min, cache.k_max,
                                      page_size=cache.page_size))


def with_length(cache: KVCache, length_B) -> KVCache:
    """A full cache cut back to `length_B` tokens (speculative decoding's rollback: later slots are
    masked and overwritten)."""
    if not isinstance(cache, FullCache):
        raise ShapeError(f"with_length: only a full cache can be rolled back, not {type(cache).__name__}")
    return FullCache(cache.k, cache.v, jnp.asarray(length_B, jnp.int32))


# ---------------------------------------------------------------------------------- page summaries


def page_summaries(k_BSGD, length_B, page_size: int):
    """(mean, min, max) of each page's written keys, float32 [B, S / page_size, G, D]; empty pages
    give 0 / +inf / -inf."""
    b, s, g, d = k_BSGD.shape
    pages = k_BSGD.reshape(b, s // page_size, page_size, g, d).astype(jnp.float32)
    slot = jnp.arange(s).reshape(s // page_size, page_size)
    live = (slot[None] < jnp.asarray(length_B)[:, None, None])[..., None, None]  # [B, nP, ps, 1, 1]
    count = live.sum(2)
    mean = jnp.where(live, pages, 0.0).sum(2) / jnp.maximum(count, 1)
    kmin = jnp.where(live, pages, jnp.inf).min(2)
    kmax = jnp.where(live, pages, -jnp.inf).max(2)
    return mean, kmin, kmax


def _with_summaries(cache: PagedCache) -> PagedCache:
    mean, kmin, kmax = page_summaries(cache.k, cache.length, cache.page_size)
    return cache.replace(k_mean=mean, k_min=kmin, k_max=kmax)


def _update_page(cache: PagedCache, pos_B) -> PagedCache:
    """Recompute the summary of the page each row just wrote (one page per row, not the cache)."""
    ps = cache.page_size
    b = cache.k.shape[0]
    n_pages = cache.k_mean.shape[1]
    page = jnp.minimum(pos_B // ps, n_pages - 1)
    slots = page[:, None] * ps + jnp.arange(ps)  # [B, ps]
    keys = jnp.take_along_axis(cache.k, slots[:, :, None, None], axis=1)  # [B, ps, G, D]
    mean, kmin, kmax = page_summaries(keys, cache.length - page * ps, ps)  # one page per row
    rows = jnp.arange(b)
    return cache.replace(k_mean=cache.k_mean.at[rows, page].set(mean[:, 0]),
                         k_min=cache.k_min.at[rows, page].set(kmin[:, 0]),
                         k_max=cache.k_max.at[rows, page].set(kmax[:, 0]))


# ------------------------------------------------------------------------------- attention layout


def streaming_positions(cache: StreamingCache):
    """(RoPE position of every slot [B, C], the newest token's position [B]) after the newest token
    was appended: positions within the cache, sinks 0..n-1 then the window oldest to newest
    (StreamingLLM Sec. 3.2), so they never exceed C - 1."""
    s, n = capacity(cache), cache.n_sinks
    w = s - n
    m = jnp.maximum(cache.length - n, 0)[:, None]  # window tokens ever written
    r = jnp.arange(s)[None, :] - n  # ring index of each slot
    wrapped = n + (r - (m - w)) % w
    pos = jnp.where(r < 0, jnp.arange(s)[None, :], jnp.where(m <= w, n + r, wrapped))
    return pos.astype(jnp.int32), (jnp.minimum(cache.length, s) - 1).astype(jnp.int32)


def ema_visible(cache: EmaSinkCache):
    """(indices [B, 1, C], counts [B, 1]) of the slots the newest token (position length - 1)
    attends: its window, plus the sink rows once position 0 has left the window."""
    s, n = capacity(cache), cache.n_sinks
    w = s - n
    p = cache.length - 1
    with_sinks = p >= w
    all_slots = jnp.arange(s, dtype=jnp.int32)
    ring_only = jnp.concatenate([jnp.arange(n, s, dtype=jnp.int32), jnp.zeros((n,), jnp.int32)])
    idx = jnp.where(with_sinks[:, None], all_slots[None], ring_only[None])
    counts = jnp.where(with_sinks, s, jnp.minimum(p + 1, w)).astype(jnp.int32)
    return idx[:, None, :], counts[:, None]


def check_cache(cache: KVCache, *, layer: int, kv_heads: int, head_dim: int) -> None:
    """ShapeError if `cache` was built for another attention layout than (kv_heads, head_dim)."""
    g, d = cache.k.shape[2], cache.k.shape[3]
    if (g, d) != (kv_heads, head_dim):
        raise ShapeError(f"cache of layer {layer} holds {g} kv heads x head dim {d} but the model has "
                         f"{kv_heads} x {head_dim}: it was built for another model config; build the caches "
                         "with horizon.infer.generate.init_caches(model, ...)")
