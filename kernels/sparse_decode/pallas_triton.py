"""Split-K sparse decode attention in Pallas (Triton lowering), after Flash-Decoding (Dao et al.
2023): each program owns one (batch, row group, split), gathers its share of the selected cache
slots block_k at a time, and writes fp32 partials (acc, max, sum); a log-sum-exp merge combines
the splits. Row group = a kv head's query heads (shared indices) or one query head (per head)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
# Programs wanted in flight: about two per SM of an H100/H200 (132 SMs).
_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel."""

    block_k: int = 64  # selected cache slots gathered per loop step (power of two >= 16)
    n_splits: int | None = None  # splits of the selected slots; None fills the GPU
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call."""

    s: int  # cache capacity
    page_size: int
    kmax: int  # index entries per row
    block_k: int
    per_split: int  # loop steps per split
    n_splits: int
    scale: float
    softcap: float | None
    interpret: bool
    num_warps: int
    num_stages: int


def plan_splits(n_steps: int, n_programs: int, n_splits: int | None) -> tuple[int, int]:
    """(per_split, n_splits): loop steps per split and the number of non-empty splits."""
    if n_splits is None:
        n_splits = -(-_TARGET_PROGRAMS // max(n_programs, 1))
    n_splits = max(1, min(int(n_splits), n_steps))
    per_split = -(-n_steps // n_splits)
    return per_split, -(-n_steps // per_split)


def _dot(a, b, *, tb=False):
    """a @ b (b transposed when tb) with fp32 accumulation; fp32 inputs stay IEEE fp32 (no TF32)."""
    dims = ((1,), (1,) if tb else (0,))
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=jnp.float32)


def _kernel(q_ref, k_ref, v_ref, row_ref, o_ref, m_ref, l_ref, *, st: Static):
    split = pl.program_id(2)
    q = q_ref[...]  # [Rp, Dp]
    count, length = row_ref[0], row_ref[1]
    ps, bk = st.page_size, st.block_k
    n_tok = count * ps
    lo = split * st.per_split
    hi = jnp.minimum(lo + st.per_split, (n_tok + bk - 1) // bk)

    def body(j, carry):
        acc, m, l = carry
        # Flat position in the row's list of selected slots: entry = flat // ps, slot in page = flat % ps.
        flat = j * bk + jnp.arange(bk, dtype=jnp.int32)
        entry = jnp.minimum(flat // ps, st.kmax - 1)
        tok = row_ref[2 + entry] * ps + flat % ps
        ok = (flat < n_tok) & (tok >= 0) & (tok < length)
        tok = jnp.clip(tok, 0, st.s - 1)  # dead lanes read a valid slot, then get masked
        k = k_ref[tok, :]
        v = v_ref[tok, :]
        s = _dot(q, k, tb=True)
        if st.softcap is None:
            s = s * (st.scale * _LOG2E)
        else:
            s = jnp.tanh(s * (st.scale / st.softcap)) * (st.softcap * _LOG2E)
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    rp, dp = q.shape
    carry = (
        jnp.zeros((rp, dp), jnp.float32),
        jnp.full((rp,), -jnp.inf, jnp.float32),
        jnp.zeros((rp,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def partials(st: Static, q, k, v, row, kv_of):
    """Split partials for q [B, NH, Rp, Dp], k/v [B, S, G, Dp], row [B, Hs, 2 + Kmax] (count,
    length, indices...): acc [B, NH, n_splits, Rp, Dp] (unnormalized), max and sum (base 2)
    [B, NH, n_splits, Rp]. kv_of maps a row group to its kv head; row index 0 when Hs = 1."""
    b, nh, rp, dp = q.shape
    s = k.shape[1]
    w = row.shape[-1]
    sh = (lambda n: n) if row.shape[1] > 1 else (lambda n: 0)
    grid = (b, nh, st.n_splits)
    return pl.pallas_call(
        functools.partial(_kernel, st=st),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, rp, dp), lambda bb, n, sp: (bb, n, 0, 0)),
            pl.BlockSpec((None, s, None, dp), lambda bb, n, sp: (bb, 0, kv_of(n), 0)),
            pl.BlockSpec((None, s, None, dp), lambda bb, n, sp: (bb, 0, kv_of(n), 0)),
            pl.BlockSpec((None, None, w), lambda bb, n, sp: (bb, sh(n), 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rp, dp), lambda bb, n, sp: (bb, n, sp, 0, 0)),
            pl.BlockSpec((None, None, None, rp), lambda bb, n, sp: (bb, n, sp, 0)),
            pl.BlockSpec((None, None, None, rp), lambda bb, n, sp: (bb, n, sp, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, nh, st.n_splits, rp, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, nh, st.n_splits, rp), jnp.float32),
            jax.ShapeDtypeStruct((b, nh, st.n_splits, rp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
        interpret=st.interpret,
        name="sparse_decode_split",
    )(q, k, v, row)


def merge(acc, m, l):
    """Log-sum-exp merge over the split axis 2: acc [..., n, R, D], m/l [..., n, R] (base 2) ->
    out [..., R, D] fp32; a row with no live slot in any split gives 0."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    w = jnp.exp2(m - m_all)  # 0 for empty splits (m = -inf)
    num = jnp.sum(acc * w[..., None], axis=2)
    den = jnp.sum(l * w, axis=2)
    return num / jnp.where(den == 0.0, 1.0, den)[..., None]
