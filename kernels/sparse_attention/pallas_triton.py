"""Block-sparse flash attention in Pallas (Triton lowering): the key/value loop of each query block
walks its table, fully-allowed blocks first (no mask) then partial ones (element masks from
positions); fp32 online softmax (FlashAttention-2, Dao 2023). Backward: a dQ kernel over the same
tables and a dK/dV kernel over the transposed (kv-block -> query-blocks) tables."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.sparse_attention.masks import element_mask

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Launch parameters; block sizes come from the Selection (block_q, block_k)."""

    # Forward defaults measured best on an H200 at D=128 (block_q=128, block_k=64): 4 warps and
    # 3-4 stages beat 8 warps by 10-40%.
    num_warps: int = 4
    num_stages: int = 4
    bwd_num_warps: int | None = None  # None: 4 for head dim <= 64, else 8
    bwd_num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable: custom_vjp non-diff argument)."""

    block_q: int
    block_k: int
    n_main: int  # main key blocks; blocks >= n_main are extra rows
    s: int  # real main keys
    sk_valid: int  # padded main length + real extra rows
    kmax: int
    qmax: int
    causal: bool
    window: int | None
    sink_tokens: int
    extra_span: int | None
    scale: float
    softcap: float | None
    has_shift: bool
    use_seg: bool
    need_valid: bool
    group: int  # query heads per kv head
    per_head: bool  # tables indexed by query head (else shared)
    sel_batch: bool  # selection arrays have the batch dim B (else 1)
    d_real: int
    config: PallasConfig
    interpret: bool


def _dot(a, b, *, ta=False, tb=False):
    """a @ b with fp32 accumulation; fp32 inputs stay IEEE fp32 (no TF32)."""
    dims = (((0,) if ta else (1,)), ((1,) if tb else (0,)))
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (dims, ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _rotate(k, shift, freq, rot, inverse=False):
    """RoPE-rotate rows of k by `shift` positions (the inverse map when inverse=True), fp32."""
    kf = k.astype(jnp.float32)
    ang = shift.astype(jnp.float32) * freq  # [Dp]
    c, s = jnp.cos(ang)[None, :], jnp.sin(ang)[None, :]
    if inverse:  # R^T y = y * c - (y * s) @ P, since P^T = -P
        return kf * c - _dot(kf * s, rot)
    return kf * c + _dot(kf, rot) * s


def _mask(st: Static, blk, qpos, kpos, qseg, kseg):
    """Element mask [bq, bk] for key block `blk` (a scalar)."""
    # Vector tests on the key index only (no scalar selects: they mis-lower in Triton).
    idx = blk * st.block_k + jnp.arange(st.block_k)
    is_extra = idx >= st.n_main * st.block_k
    k_valid = None
    if st.need_valid:
        k_valid = ((idx < st.s) | (is_extra & (idx < st.sk_valid)))[None, :]
    return element_mask(
        qpos[:, None],
        kpos[None, :],
        q_seg=None if qseg is None else qseg[:, None],
        k_seg=None if kseg is None else kseg[None, :],
        is_extra=is_extra[None, :],
        k_valid=k_valid,
        causal=st.causal,
        window=st.window,
        sink_tokens=st.sink_tokens,
        extra_span=st.extra_span,
    )


def _scores(st: Static, q, k):
    """Base-2 logits [bq, bk] (scaled, soft-capped, times log2 e) and tanh for the cap's gradient."""
    s = _dot(q, k, tb=True)
    if st.softcap is None:
        return s * (st.scale * _LOG2E), None
    t = jnp.tanh(s * (st.scale / st.softcap))
    return t * (st.softcap * _LOG2E), t


def _unpack(refs, names):
    return dict(zip(names, refs))


def _key_block(st: Static, r, j, q, qpos, qseg, masked):
    """The j-th live key block of a query block's row (the forward and dQ kernels' loop step):
    k and v loaded, k rotated by the block's RoPE shift, then the base-2 scores s [bq, bk] with
    masked entries at -inf when `masked`, and the soft-cap tanh (None without a cap)."""
    row = r["row"]
    blk = row[2 + j]
    start = pl.multiple_of(blk * st.block_k, st.block_k)
    k = r["k"][pl.ds(start, st.block_k), :]
    v = r["v"][pl.ds(start, st.block_k), :]
    if st.has_shift:
        k = _rotate(k, row[2 + st.kmax + j], r["freq"][...], r["rot"][...]).astype(v.dtype)
    s, t = _scores(st, q, k)
    if masked:
        kpos = r["kpos"][pl.ds(start, st.block_k)]
        kseg = r["kseg"][pl.ds(start, st.block_k)] if st.use_seg else None
        s = jnp.where(_mask(st, blk, qpos, kpos, qseg, kseg), s, -jnp.inf)
    return k, v, s, t


# ------------------------------------------------------------------ forward


def _fwd_kernel(*refs, st: Static, names):
    r = _unpack(refs, names)
    q = r["q"][...]
    qpos = r["qpos"][...]
    qseg = r["qseg"][...] if st.use_seg else None
    row = r["row"]
    count, n_full = row[0], row[1]
    bq, dp = q.shape

    def body(j, carry, masked):
        acc, m, l = carry
        _, v, s, _ = _key_block(st, r, j, q, qpos, qseg, masked)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (
        jnp.zeros((bq, dp), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)
    empty = l == 0.0
    r["o"][...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(r["o"].dtype)
    # Rows with no allowed key: lse = +inf makes every backward probability exactly 0.
    r["lse"][...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _sel_maps(st: Static):
    """Index helpers for selection arrays (batch 1 or B, heads 1 or H)."""
    sb = (lambda b: b) if st.sel_batch else (lambda b: 0)
    sh = (lambda h: h) if st.per_head else (lambda h: 0)
    return sb, sh


def _warps(st: Static, bwd=False):
    w = st.config.bwd_num_warps if bwd else st.config.num_warps
    if w is None:  # backward default
        w = 4 if st.d_real <= 64 else 8
    return w


def _forward(st: Static, q, k, v, row_f, qpos, kpos, qseg, kseg, freq, rot):
    b, tp, h, dp = q.shape
    sk = k.shape[1]
    bq = st.block_q
    n_q = tp // bq
    sb, sh = _sel_maps(st)
    g_of = lambda hh: hh // st.group
    names, args, specs = [], [], []

    def add(name, x, spec):
        if x is not None:
            names.append(name)
            args.append(x)
            specs.append(spec)

    # Grid axis 0 runs the last query blocks first: under causal masks they carry the most work.
    rev = lambda i: n_q - 1 - i
    add("q", q, pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, rev(i), hh, 0)))
    add("k", k, pl.BlockSpec((None, sk, None, dp), lambda i, bb, hh: (bb, 0, g_of(hh), 0)))
    add("v", v, pl.BlockSpec((None, sk, None, dp), lambda i, bb, hh: (bb, 0, g_of(hh), 0)))
    w = row_f.shape[-1]
    add(
        "row",
        row_f,
        pl.BlockSpec((None, None, None, w), lambda i, bb, hh: (sb(bb), sh(hh), rev(i), 0)),
    )
    add("qpos", qpos, pl.BlockSpec((None, bq), lambda i, bb, hh: (sb(bb), rev(i))))
    add("kpos", kpos, pl.BlockSpec((None, sk), lambda i, bb, hh: (sb(bb), 0)))
    if st.use_seg:
        add("qseg", qseg, pl.BlockSpec((None, bq), lambda i, bb, hh: (sb(bb), rev(i))))
        add("kseg", kseg, pl.BlockSpec((None, sk), lambda i, bb, hh: (sb(bb), 0)))
    if st.has_shift:
        add("freq", freq, pl.BlockSpec((dp,), lambda i, bb, hh: (0,)))
        add("rot", rot, pl.BlockSpec((dp, dp), lambda i, bb, hh: (0, 0)))
    out_names = ["o", "lse"]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, names=names + out_names),
        grid=(n_q, b, h),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, rev(i), hh, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, rev(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=_warps(st), num_stages=st.config.num_stages),
        interpret=st.interpret,
        name="sparse_attention_fwd",
    )(*args)
    return out, lse


# ------------------------------------------------------------------ backward: dQ


def _dq_kernel(*refs, st: Static, names):
    r = _unpack(refs, names)
    q = r["q"][...]
    do = r["do"][...]
    lse = r["lse"][...]
    delta = r["delta"][...]
    qpos = r["qpos"][...]
    qseg = r["qseg"][...] if st.use_seg else None
    row = r["row"]
    count, n_full = row[0], row[1]
    bq, dp = q.shape

    def body(j, dq, masked):
        k, v, s, t = _key_block(st, r, j, q, qpos, qseg, masked)
        p = jnp.exp2(s - lse[:, None])
        dp_ = _dot(do, v, tb=True)
        ds = p * (dp_ - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jnp.zeros((bq, dp), jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, count, functools.partial(body, masked=True), dq)
    r["dq"][...] = (dq * st.scale).astype(r["dq"].dtype)


# ------------------------------------------------------------------ backward: dK, dV


def _dkdv_kernel(*refs, st: Static, names):
    r = _unpack(refs, names)
    blk = pl.program_id(0)
    k = r["k"][...]
    v = r["v"][...]
    kpos = r["kpos"][...]
    kseg = r["kseg"][...] if st.use_seg else None
    row = r["row"]
    count, n_full = row[0], row[1]
    bk, dp = k.shape
    bq = st.block_q

    def body(j, carry, masked):
        dk, dv = carry
        qi = row[2 + j]
        start = pl.multiple_of(qi * bq, bq)
        q = r["q"][pl.ds(start, bq), :]
        do = r["do"][pl.ds(start, bq), :]
        lse = r["lse"][pl.ds(start, bq)]
        delta = r["delta"][pl.ds(start, bq)]
        kk = k
        if st.has_shift:
            shift = row[2 + st.qmax + j]
            kk = _rotate(k, shift, r["freq"][...], r["rot"][...]).astype(v.dtype)
        s, t = _scores(st, q, kk)
        if masked:
            qpos = r["qpos"][pl.ds(start, bq)]
            qseg = r["qseg"][pl.ds(start, bq)] if st.use_seg else None
            s = jnp.where(_mask(st, blk, qpos, kpos, qseg, kseg), s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, ta=True)
        dp_ = _dot(do, v, tb=True)
        ds = p * (dp_ - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk_j = _dot(ds.astype(q.dtype), q, ta=True)
        if st.has_shift:
            dk_j = _rotate(dk_j, shift, r["freq"][...], r["rot"][...], inverse=True)
        return dk + dk_j, dv

    carry = (jnp.zeros((bk, dp), jnp.float32), jnp.zeros((bk, dp), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    dk, dv = lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)
    r["dk"][...] = dk * st.scale
    r["dv"][...] = dv


def _backward(st: Static, q, k, v, out, lse, do, row_f, row_t, qpos, kpos, qseg, kseg, freq, rot):
    b, tp, h, dp = q.shape
    sk, g = k.shape[1], k.shape[2]
    bq, bk = st.block_q, st.block_k
    n_q, n_kv = tp // bq, sk // bk
    sb, sh = _sel_maps(st)
    g_of = lambda hh: hh // st.group
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    params = plgpu.CompilerParams(num_warps=_warps(st, True), num_stages=st.config.bwd_num_stages)

    # dQ: grid over query blocks, same tables as the forward.
    names, args, specs = [], [], []

    def add(name, x, spec):
        names.append(name)
        args.append(x)
        specs.append(spec)

    add("q", q, pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)))
    add("k", k, pl.BlockSpec((None, sk, None, dp), lambda i, bb, hh: (bb, 0, g_of(hh), 0)))
    add("v", v, pl.BlockSpec((None, sk, None, dp), lambda i, bb, hh: (bb, 0, g_of(hh), 0)))
    add("do", do, pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)))
    add("lse", lse, pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)))
    add("delta", delta, pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i)))
    wf = row_f.shape[-1]
    add(
        "row", row_f, pl.BlockSpec((None, None, None, wf), lambda i, bb, hh: (sb(bb), sh(hh), i, 0))
    )
    add("qpos", qpos, pl.BlockSpec((None, bq), lambda i, bb, hh: (sb(bb), i)))
    add("kpos", kpos, pl.BlockSpec((None, sk), lambda i, bb, hh: (sb(bb), 0)))
    if st.use_seg:
        add("qseg", qseg, pl.BlockSpec((None, bq), lambda i, bb, hh: (sb(bb), i)))
        add("kseg", kseg, pl.BlockSpec((None, sk), lambda i, bb, hh: (sb(bb), 0)))
    if st.has_shift:
        add("freq", freq, pl.BlockSpec((dp,), lambda i, bb, hh: (0,)))
        add("rot", rot, pl.BlockSpec((dp, dp), lambda i, bb, hh: (0, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, names=names + ["dq"]),
        grid=(n_q, b, h),
        in_specs=specs,
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=st.interpret,
        name="sparse_attention_dq",
    )(*args)

    # dK/dV: grid over key blocks, transposed tables; one partial per query head, summed per group.
    names, args, specs = [], [], []
    add("q", q, pl.BlockSpec((None, tp, None, dp), lambda j, bb, hh: (bb, 0, hh, 0)))
    add("k", k, pl.BlockSpec((None, bk, None, dp), lambda j, bb, hh: (bb, j, g_of(hh), 0)))
    add("v", v, pl.BlockSpec((None, bk, None, dp), lambda j, bb, hh: (bb, j, g_of(hh), 0)))
    add("do", do, pl.BlockSpec((None, tp, None, dp), lambda j, bb, hh: (bb, 0, hh, 0)))
    add("lse", lse, pl.BlockSpec((None, None, tp), lambda j, bb, hh: (bb, hh, 0)))
    add("delta", delta, pl.BlockSpec((None, None, tp), lambda j, bb, hh: (bb, hh, 0)))
    wt = row_t.shape[-1]
    add(
        "row", row_t, pl.BlockSpec((None, None, None, wt), lambda j, bb, hh: (sb(bb), sh(hh), j, 0))
    )
    add("qpos", qpos, pl.BlockSpec((None, tp), lambda j, bb, hh: (sb(bb), 0)))
    add("kpos", kpos, pl.BlockSpec((None, bk), lambda j, bb, hh: (sb(bb), j)))
    if st.use_seg:
        add("qseg", qseg, pl.BlockSpec((None, tp), lambda j, bb, hh: (sb(bb), 0)))
        add("kseg", kseg, pl.BlockSpec((None, bk), lambda j, bb, hh: (sb(bb), j)))
    if st.has_shift:
        add("freq", freq, pl.BlockSpec((dp,), lambda j, bb, hh: (0,)))
        add("rot", rot, pl.BlockSpec((dp, dp), lambda j, bb, hh: (0, 0)))
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, names=names + ["dk", "dv"]),
        grid=(n_kv, b, h),
        in_specs=specs,
        out_specs=[
            pl.BlockSpec((None, bk, None, dp), lambda j, bb, hh: (bb, j, hh, 0)),
            pl.BlockSpec((None, bk, None, dp), lambda j, bb, hh: (bb, j, hh, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, sk, h, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, sk, h, dp), jnp.float32),
        ],
        compiler_params=params,
        interpret=st.interpret,
        name="sparse_attention_dkdv",
    )(*args)
    dk = dk_h.reshape(b, sk, g, st.group, dp).sum(3).astype(k.dtype)
    dv = dv_h.reshape(b, sk, g, st.group, dp).sum(3).astype(v.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def sparse_attention(st: Static, q, k, v, aux):
    """out [B, Tp, H, Dp] for block-aligned operands (layout.pack) and aux = (row_f, row_t, qpos,
    kpos, qseg, kseg, freq, rot): row_f [Bs, Hs, nQ, 2 + Kmax (+ Kmax shifts)] holds (count,
    full count, blocks..., shifts...), row_t the same for the transposed tables."""
    row_f, _, qpos, kpos, qseg, kseg, freq, rot = aux
    return _forward(st, q, k, v, row_f, qpos, kpos, qseg, kseg, freq, rot)[0]


def _vjp_fwd(st, q, k, v, aux):
    row_f, _, qpos, kpos, qseg, kseg, freq, rot = aux
    out, lse = _forward(st, q, k, v, row_f, qpos, kpos, qseg, kseg, freq, rot)
    return out, (q, k, v, out, lse, aux)


def _vjp_bwd(st, res, do):
    q, k, v, out, lse, aux = res
    row_f, row_t, qpos, kpos, qseg, kseg, freq, rot = aux
    dq, dk, dv = _backward(
        st, q, k, v, out, lse, do, row_f, row_t, qpos, kpos, qseg, kseg, freq, rot
    )
    zeros_aux = jax.tree.map(_zero_cotangent, aux)
    return dq, dk, dv, zeros_aux


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)
