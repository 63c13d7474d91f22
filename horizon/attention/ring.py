"""Context-parallel attention: ring attention (Liu, Zaharia & Abbeel, 2023, "Ring Attention with
Blockwise Transformers") and an all-gather-KV variant, over the `context` mesh axis.

Each device holds a shard of the sequence. Key/value shards rotate around the ring with ppermute
while partial outputs merge by online softmax (Milakov & Gimelshein, 2018). A (query chunk, key
chunk) pair with no visible element (causal, document, window or block-table mask) is skipped;
the zig-zag layout (device d holds chunks d and 2n-1-d, as in Striped/Llama-3 context parallelism)
gives every device the same causal work per ring step.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from horizon.errors import ConfigError, ShapeError

Layout = Literal["contiguous", "zigzag"]
Variant = Literal["ring", "allgather"]
_F32 = jnp.float32


# ---------------------------------------------------------------- layouts (static, numpy)


def zigzag_indices(T: int, n: int) -> np.ndarray:
    """int32 [T]: the original index of each position of a zig-zag ordered sequence.

    The sequence is cut into 2n chunks; shard d (positions [d*T/n, (d+1)*T/n)) holds chunks d and
    2n-1-d, so under a causal mask every shard has the same amount of work."""
    if n < 1 or T % (2 * n):
        raise ShapeError(f"zig-zag layout: sequence length {T} is not a multiple of 2 x context size {n}; "
                         f"pick data.seq_len as a multiple of {2 * max(n, 1)}")
    c = T // (2 * n)
    chunks = np.arange(T, dtype=np.int32).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def layout_indices(T: int, n: int, layout: Layout) -> np.ndarray:
    """int32 [T]: original token index at each position of `layout` over n shards."""
    if layout == "zigzag":
        return zigzag_indices(T, n)
    if layout != "contiguous":
        raise ConfigError(f"context layout {layout!r} is unknown; use 'contiguous' or 'zigzag'")
    if n < 1 or T % n:
        raise ShapeError(f"context parallelism: sequence length {T} is not a multiple of the context "
                         f"axis size {n}; pick data.seq_len as a multiple of {n}")
    return np.arange(T, dtype=np.int32)


def to_layout(x, n: int, layout: Layout, axis: int = 1):
    """Reorder axis `axis` (length T, natural order) into `layout` over n shards."""
    return jnp.take(x, layout_indices(x.shape[axis], n, layout), axis=axis) if layout != "contiguous" else x


def from_layout(x, n: int, layout: Layout, axis: int = 1):
    """Inverse of `to_layout`: back to natural token order."""
    if layout == "contiguous":
        return x
    return jnp.take(x, np.argsort(layout_indices(x.shape[axis], n, layout)), axis=axis)


# ---------------------------------------------------------------- block tables


def block_live_from_selection(selection) -> tuple[jax.Array, dict]:
    """(live [Bs, Hs, nQ, nK] bool, mask options) from a kernels.sparse_attention Selection.

    The Selection's block set becomes the block table; its causal / window / sink options become
    ring_attention keyword arguments. Extra rows and RoPE remaps have no ring equivalent."""
    if getattr(selection, "extra_k", None) is not None or getattr(selection, "kv_shift", None) is not None:
        raise ShapeError("ring attention: a Selection with extra rows (sinks summaries, pooled tokens) or a "
                         "RoPE remap (kv_shift) cannot drive the ring; use a static block policy")
    kv_blocks = jnp.asarray(selection.kv_blocks)
    counts = jnp.asarray(selection.counts)
    n_main = math.ceil(int(selection.k_positions.shape[1]) / selection.block_k)
    kmax = kv_blocks.shape[-1]
    slot_live = jnp.arange(kmax) < counts[..., None]  # [Bs, Hs, nQ, Kmax]
    onehot = (kv_blocks[..., None] == jnp.arange(n_main)) & slot_live[..., None]
    live = onehot.any(-2)
    options = dict(causal=bool(selection.causal), window=selection.window,
                   sink_tokens=int(selection.sink_tokens), block_q=int(selection.block_q),
                   block_k=int(selection.block_k))
    return live, options


def _as_table(block_live) -> jax.Array:
    t = jnp.asarray(block_live, bool)
    if t.ndim == 2:
        t = t[None, None]
    if t.ndim != 4:
        raise ShapeError(f"ring attention: block_live must be [nQ, nK] or [Bs, Hs, nQ, nK], got shape {t.shape}")
    return t


# ---------------------------------------------------------------- the per-device computation


def _pair_mask(qpos_BT, kpos_BS, qseg_BT, kseg_BS, table, *, causal, window, sink_tokens, block_q, block_k):
    """[B, Hm, T, S] bool: which (query, key) pairs of two chunks are visible (Hm = 1 or H)."""
    qp, kp = qpos_BT[:, :, None], kpos_BS[:, None, :]
    m = qseg_BT[:, :, None] == kseg_BS[:, None, :]
    if causal:
        m &= kp <= qp
    if window is not None:
        m &= (jnp.abs(qp - kp) < window) | (kp < sink_tokens)
    m = m[:, None]
    if table is not None:
        qb, kb = qpos_BT // block_q, kpos_BS // block_k
        per_b = jax.vmap(lambda tb, q, k: tb[:, q][:, :, k], in_axes=(0 if table.shape[0] > 1 else None, 0, 0))
        m &= per_b(table if table.shape[0] > 1 else table[0], qb, kb)
    return m


def _attend_pair(acc, q_BGRTD, k_BSGD, v_BSGD, mask_BHTS, scale):
    """Merge one chunk pair into the running (max, denominator, unnormalised output) by online softmax."""
    m_BGRT, l_BGRT, o_BGRTD = acc
    B, G, R, T, _ = q_BGRTD.shape
    s = jnp.einsum("bgrtd,bsgd->bgrts", q_BGRTD, k_BSGD, preferred_element_type=_F32) * scale
    mask = mask_BHTS.reshape(B, G, R, T, -1) if mask_BHTS.shape[1] > 1 else mask_BHTS[:, :, None]
    s = jnp.where(mask, s, -jnp.inf)
    # The running max only keeps exp() in range; the result does not depend on it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m_BGRT, s.max(-1)))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(m_BGRT - m_safe)
    l_new = l_BGRT * corr + p.sum(-1)
    pv = jnp.einsum("bgrts,bsgd->bgrtd", p.astype(v_BSGD.dtype), v_BSGD, preferred_element_type=_F32)
    return m_new, l_new, o_BGRTD * corr[..., None] + pv


def ring_attention(q_BTHD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array, *, q_positions: jax.Array,
                   k_positions: jax.Array, q_segment_ids: jax.Array, k_segment_ids: jax.Array, axis_name: str,
                   variant: Variant = "ring", causal: bool = True, window: int | None = None,
                   sink_tokens: int = 0, block_live: jax.Array | None = None, block_q: int = 64,
                   block_k: int = 64, chunks_per_shard: int = 2, scale: float | None = None) -> jax.Array:
    """Attention of this device's queries over the keys of every device on `axis_name`.

    Call inside shard_map; all arrays are this device's shard. q_BTHD [B, T, H, D], k/v_BSGD
    [B, S, G, D] (G divides H); positions int [B, T] / [B, S]: each token's index in the whole
    sequence (the causal order: key j is visible from query i iff pos_j <= pos_i); segment ids
    int [B, T] / [B, S] (documents). `window` / `sink_tokens`: sliding window |pos_i - pos_j| <
    window, sinks pos_j < sink_tokens. `block_live` bool [Bs, Hs, nQ, nK] (or [nQ, nK]) over
    blocks of block_q x block_k tokens of the whole sequence: pairs of dead blocks are masked.
    The local shard is cut into `chunks_per_shard` chunks; a (query chunk, key chunk) pair with no
    visible element is skipped. Rows that see no key give 0. Returns [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q_BTHD.shape
    S, G = k_BSGD.shape[1], k_BSGD.shape[2]
    if H % G:
        raise ShapeError(f"ring attention: kv heads {G} do not divide query heads {H}")
    n_sub = chunks_per_shard
    if T % n_sub or S % n_sub:
        raise ShapeError(f"ring attention: local lengths T={T}, S={S} are not multiples of "
                         f"chunks_per_shard={n_sub}")
    R = H // G
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    table = None if block_live is None else _as_table(block_live)
    mask_kw = dict(causal=causal, window=window, sink_tokens=sink_tokens, block_q=block_q, block_k=block_k)
    attend = jax.checkpoint(_attend_pair, static_argnums=(5,))  # backward recomputes scores

    # Chunks stacked on a leading axis so one scan body (one cond) visits every chunk pair.
    chunked = lambda a, n_len: a.reshape(a.shape[0], n_sub, n_len // n_sub, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731
    q_cBTGRD = chunked(q_BTHD.reshape(B, T, G, R, D), T)
    qpos_cBT, qseg_cBT = chunked(q_positions, T), chunked(q_segment_ids, T)
    tq = T // n_sub
    accs = (jnp.full((n_sub, B, G, R, tq), -jnp.inf, _F32), jnp.zeros((n_sub, B, G, R, tq), _F32),
            jnp.zeros((n_sub, B, G, R, tq, D), _F32))

    def visit(accs, k, v, kpos, kseg):
        k_c, v_c, kpos_c, kseg_c = chunked(k, S), chunked(v, S), chunked(kpos, S), chunked(kseg, S)

        def pair(accs, ij):
            i, j = ij // n_sub, ij % n_sub
            q_BGRTD = q_cBTGRD[i].transpose(0, 2, 3, 1, 4)
            mask = _pair_mask(qpos_cBT[i], kpos_c[j], qseg_cBT[i], kseg_c[j], table, **mask_kw)
            acc = jax.tree.map(lambda a: a[i], accs)
            acc = jax.lax.cond(mask.any(), lambda a, *o: attend(a, *o, scale), lambda a, *o: a,
                               acc, q_BGRTD, k_c[j], v_c[j], mask)
            return jax.tree.map(lambda a, x: a.at[i].set(x), accs, acc), None

        return jax.lax.scan(pair, accs, jnp.arange(n_sub * n_sub))[0]

    n = jax.lax.axis_size(axis_name)
    if variant == "allgather":
        # One collective, then the same chunk-pair loop over the whole sequence (short rings).
        gather = lambda a: jax.lax.all_gather(a, axis_name, axis=0)  # noqa: E731  [n, B, S, ...]
        kv_all = tuple(map(gather, (k_BSGD, v_BSGD, k_positions, k_segment_ids)))
        accs, _ = jax.lax.scan(lambda a, kv: (visit(a, *kv), None), accs, kv_all)
    elif variant == "ring":
        perm = [(d, (d + 1) % n) for d in range(n)]
        rotate = lambda kv: jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, perm), kv)  # noqa: E731

        def step(carry, _):
            accs, kv = carry
            nxt = rotate(kv)  # issued before the compute on kv so the two can overlap
            return (visit(accs, *kv), nxt), None

        kv = (k_BSGD, v_BSGD, k_positions, k_segment_ids)
        (accs, kv), _ = jax.lax.scan(step, (accs, kv), length=n - 1)
        accs = visit(accs, *kv)  # the last block needs no rotation after it
    else:
        raise ConfigError(f"ring attention: variant {variant!r} is unknown; use 'ring' or 'allgather'")

    _, l_cBGRT, o_cBGRTD = accs
    out_cBGRTD = jnp.where(l_cBGRT[..., None] > 0, o_cBGRTD / jnp.where(l_cBGRT > 0, l_cBGRT, 1.0)[..., None], 0.0)
    # [c, B, G, R, t, D] -> [B, c, t, G, R, D] -> [B, T, H, D]
    out_BTHD = out_cBGRTD.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, H, D)
    return out_BTHD.astype(q_BTHD.dtype)


# ---------------------------------------------------------------- the jit-level entry point


def _batch_and_head_axes(mesh, axis: str, B: int, H: int, G: int):
    """Mesh axes for batch and heads inside the shard_map: as the logical rules shard activations."""
    from horizon.train.sharding import logical_to_spec

    spec = logical_to_spec(("batch", "length", "heads"))
    b_axes = spec[0]
    b_tuple = (b_axes,) if isinstance(b_axes, str) else tuple(b_axes or ())
    b_tuple = tuple(a for a in b_tuple if a != axis)
    b_size = math.prod(mesh.shape[a] for a in b_tuple)
    b_spec = (b_tuple[0] if len(b_tuple) == 1 else b_tuple) if b_tuple and B % b_size == 0 else None
    h_ax = spec[2] if isinstance(spec[2], str) else None
    # Heads shard only where both query and kv heads split evenly (GQA groups stay whole).
    h_spec = h_ax if h_ax and h_ax != axis and H % mesh.shape[h_ax] == 0 and G % mesh.shape[h_ax] == 0 else None
    return b_spec, h_spec


def context_parallel_attention(q_BTHD: jax.Array, k_BTGD: jax.Array, v_BTGD: jax.Array, *,
                               segment_ids_BT: jax.Array, mesh=None, axis: str = "context",
                               layout: Layout = "contiguous", variant: Variant = "ring",
                               causal: bool = True, window: int | None = None, sink_tokens: int = 0,
                               block_live=None, block_q: int = 64, block_k: int = 64,
                               chunks_per_shard: int = 2) -> jax.Array:
    """Self-attention over the whole sequence with the T axis sharded over mesh axis `axis`.

    Arrays are global (jit level): q_BTHD [B, T, H, D], k/v_BTGD [B, T, G, D], segment_ids_BT
    int [B, T], with T in `layout` order ("zigzag": positions reordered by `to_layout`, the order
    to keep through the whole model). `block_live`: a [nQ, nK] / [Bs, Hs, nQ, nK] bool table over
    natural-order blocks, or a Selection (its block set and causal/window/sink options are used).
    Returns [B, T, H, D] in the same layout. ShapeError if the context size does not divide T.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        raise ConfigError(f"context_parallel_attention needs an active mesh with a {axis!r} axis "
                          "(jax.set_mesh(horizon.train.sharding.make_mesh(...)))")
    B, T, H, D = q_BTHD.shape
    G = k_BTGD.shape[2]
    if k_BTGD.shape != v_BTGD.shape or k_BTGD.shape[:2] != (B, T) or k_BTGD.shape[3] != D:
        raise ShapeError(f"context_parallel_attention: k {k_BTGD.shape} / v {v_BTGD.shape} do not match "
                         f"q {q_BTHD.shape} (self-attention: same B and T)")
    n = mesh.shape[axis]
    pos_T = layout_indices(T, n, layout)
    local = T // n
    if local % chunks_per_shard:
        raise ShapeError(f"context_parallel_attention: {local} tokens per shard are not a multiple of "
                         f"chunks_per_shard={chunks_per_shard}")
    opts = dict(causal=causal, window=window, sink_tokens=sink_tokens, block_q=block_q, block_k=block_k)
    table = None
    if block_live is not None:
        if hasattr(block_live, "kv_blocks"):
            table, sel_opts = block_live_from_selection(block_live)
            opts.update(sel_opts)
        else:
            table = _as_table(block_live)
        need = (math.ceil(T / opts["block_q"]), math.ceil(T / opts["block_k"]))
        if table.shape[0] not in (1, B) or table.shape[1] not in (1, H) or tuple(table.shape[2:]) != need:
            raise ShapeError(f"context_parallel_attention: block table {tuple(table.shape)} does not cover "
                             f"T={T} in blocks of {opts['block_q']}x{opts['block_k']}; expected "
                             f"[1 or {B}, 1 or {H}, {need[0]}, {need[1]}]")
    b, h = _batch_and_head_axes(mesh, axis, B, H, G)
    pos_BT = jnp.broadcast_to(jnp.asarray(pos_T), (B, T))
    seg_BT = segment_ids_BT.astype(jnp.int32)

    def local_fn(q, k, v, pos, seg, *tbl):
        return ring_attention(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg,
                              axis_name=axis, variant=variant, block_live=tbl[0] if tbl else None,
                              chunks_per_shard=chunks_per_shard, **opts)

    x_spec, t_spec = P(b, axis, h, None), P(b, axis)
    in_specs = [x_spec, x_spec, x_spec, t_spec, t_spec]
    args = [q_BTHD, k_BTGD, v_BTGD, pos_BT, seg_BT]
    if table is not None:
        tb = b if table.shape[0] == B and table.shape[0] > 1 else None
        th = h if table.shape[1] > 1 else None
        in_specs.append(P(tb, th, None, None))
        args.append(table)
    fn = jax.shard_map(local_fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=x_spec, check_vma=False)
    return fn(*args)
