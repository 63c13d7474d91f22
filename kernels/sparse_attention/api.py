"""kernels.sparse_attention.attend: the public block-sparse attention. Validates shapes, dtypes and
the Selection at trace time (KernelInputError), then dispatches to the Pallas kernel, the XLA
gather path or the dense reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.dispatch import IMPLEMENTATIONS  # noqa: F401  (re-exported)
from kernels.dispatch import resolve_implementation as _resolve
from kernels.errors import KernelInputError, check_qkv
from kernels.sparse_attention import pallas_triton
from kernels.sparse_attention.layout import pack
from kernels.sparse_attention.masks import rotate_half_matrix
from kernels.sparse_attention.reference import attend_reference
from kernels.sparse_attention.selection import Selection, with_transpose
from kernels.sparse_attention.xla import attend_xla

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_implementation(implementation: str | None, interpret: bool = False) -> str:
    """The implementation `attend` runs: None picks pallas on GPU (or interpret=True), else xla."""
    return _resolve("attend", implementation, interpret)


def attend(
    q_BTHD,
    k_BSGD,
    v_BSGD,
    selection: Selection,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    config: pallas_triton.PallasConfig | None = None,
):
    """Block-sparse attention: out [B, T, H, D] attends, for each query, the keys its Selection
    allows (see Selection). k and v are [B, S, G, D] with H a multiple of G (grouped-query).

    scale: logit scale (default D ** -0.5); softcap: logits -> softcap * tanh(logits / softcap).
    implementation: None (pallas on GPU, xla on CPU), "pallas" (interpret=True runs it on CPU),
    "xla" (gathers the live blocks) or "reference" (dense masked spec).
    """
    impl = resolve_implementation(implementation, interpret)
    _validate(q_BTHD, k_BSGD, v_BSGD, selection, impl, softcap)
    if impl == "reference":
        return attend_reference(q_BTHD, k_BSGD, v_BSGD, selection, scale=scale, softcap=softcap)
    if impl == "xla":
        return attend_xla(q_BTHD, k_BSGD, v_BSGD, selection, scale=scale, softcap=softcap)
    if not interpret and jax.default_backend() != "gpu":
        raise KernelInputError(
            f"attend: implementation='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
            "pass interpret=True to run the kernel on CPU, or use implementation='xla'"
        )
    return _attend_pallas(q_BTHD, k_BSGD, v_BSGD, selection, scale, softcap, config, interpret)


def _attend_pallas(q, k, v, sel: Selection, scale, softcap, config, interpret):
    _b, t, h, d = q.shape
    g = k.shape[2]
    sel = with_transpose(sel)
    pk = pack(q, k, v, sel)
    dp = max(16, 1 << (d - 1).bit_length())
    padd = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, dp - d)])
    qp, kp, vp = padd(pk.q), padd(pk.k), padd(pk.v)

    kv_blocks = jnp.asarray(sel.kv_blocks, jnp.int32)
    counts = jnp.asarray(sel.counts, jnp.int32)
    full = (
        jnp.zeros_like(counts)
        if sel.full_counts is None
        else jnp.asarray(sel.full_counts, jnp.int32)
    )
    q_blocks = jnp.asarray(sel.q_blocks, jnp.int32)
    q_slots = jnp.asarray(sel.q_slots, jnp.int32)
    q_counts = jnp.asarray(sel.q_counts, jnp.int32)
    q_full = jnp.asarray(sel.q_full_counts, jnp.int32)
    row_f = [counts[..., None], full[..., None], kv_blocks]
    row_t = [q_counts[..., None], q_full[..., None], q_blocks]
    freq = rot = None
    if sel.kv_shift is not None:
        shift = jnp.asarray(sel.kv_shift, jnp.int32)
        row_f.append(shift)
        kmax = shift.shape[-1]
        flat = (q_blocks * kmax + q_slots).reshape(q_blocks.shape[:2] + (-1,))
        lead = jnp.broadcast_shapes(shift.shape[:2], flat.shape[:2])
        q_shift = jnp.take_along_axis(
            jnp.broadcast_to(
                shift.reshape(shift.shape[:2] + (-1,)), lead + (shift.shape[2] * kmax,)
            ),
            jnp.broadcast_to(flat, lead + flat.shape[2:]),
            axis=-1,
        ).reshape(lead + q_blocks.shape[2:])
        row_t.append(q_shift)
        inv = jnp.asarray(sel.rope_inv_freq, jnp.float32)
        freq = jnp.pad(jnp.concatenate([inv, inv]), (0, dp - d))
        rot_np = np.zeros((dp, dp), np.float32)
        rot_np[:d, :d] = rotate_half_matrix(d)
        rot = jnp.asarray(rot_np)

    # Every selection array gets one batch size (1 or B) so the index maps agree.
    arrays = [pk.q_pos, pk.k_pos, pk.q_seg, pk.k_seg] + row_f + row_t
    bsel = max(x.shape[0] for x in arrays if x is not None)
    bc = lambda x: None if x is None else jnp.broadcast_to(x, (bsel,) + tuple(x.shape[1:]))
    hs = max(x.shape[1] for x in row_f + row_t)
    bch = lambda x: jnp.broadcast_to(x, (bsel, hs) + tuple(x.shape[2:]))
    row_f = jnp.concatenate([bch(x) for x in row_f], axis=-1)
    row_t = jnp.concatenate([bch(x) for x in row_t], axis=-1)
    st = pallas_triton.Static(
        block_q=sel.block_q,
        block_k=sel.block_k,
        n_main=sel.n_main_blocks,
        s=pk.s,
        sk_valid=sel.n_main_blocks * sel.block_k + sel.n_extra,
        kmax=int(kv_blocks.shape[-1]),
        qmax=int(q_blocks.shape[-1]),
        causal=sel.causal,
        window=sel.window,
        sink_tokens=sel.sink_tokens,
        extra_span=sel.extra_span,
        scale=float(d**-0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap),
        has_shift=sel.kv_shift is not None,
        use_seg=pk.q_seg is not None,
        need_valid=bool((~pk.k_valid).any()),
        group=h // g,
        per_head=hs > 1,
        sel_batch=bsel > 1,
        d_real=d,
        config=config or pallas_triton.PallasConfig(),
        interpret=bool(interpret),
    )
    aux = (row_f, row_t, bc(pk.q_pos), bc(pk.k_pos), bc(pk.q_seg), bc(pk.k_seg), freq, rot)
    out = pallas_triton.sparse_attention(st, qp, kp, vp, aux)
    return out[:, :t, :, :d]


# ------------------------------------------------------------------ validation


def _shape(x):
    return tuple(int(n) for n in x.shape)


def _validate(q, k, v, sel, impl, softcap):
    name = "attend"
    if not isinstance(sel, Selection):
        raise KernelInputError(f"{name}: selection must be a Selection, got {type(sel).__name__}")
    for arg, x in (("q_BTHD", q), ("k_BSGD", k), ("v_BSGD", v)):
        if x.ndim != 4:
            raise KernelInputError(f"{name}: {arg} must be 4-D, got shape {_shape(x)}")
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise KernelInputError(
                f"{name}: {arg} dtype {x.dtype} is not float32, bfloat16 or float16"
            )
    b, t, h, d = _shape(q)
    _, s, g, _ = _shape(k)
    check_qkv(name, q, k, v, q_name="q_BTHD", k_name="k_BSGD", v_name="v_BSGD")
    bq, bk = sel.block_q, sel.block_k
    for arg, blk in (("block_q", bq), ("block_k", bk)):
        if not isinstance(blk, (int, np.integer)) or blk <= 0:
            raise KernelInputError(f"{name}: selection.{arg}={blk!r} must be a positive int")
        if impl == "pallas" and (blk < 16 or blk & (blk - 1)):
            raise KernelInputError(
                f"{name}: selection.{arg}={blk} must be a power of two >= 16 for the Pallas kernel"
            )
    kb = sel.kv_blocks
    if kb.ndim != 4:
        raise KernelInputError(
            f"{name}: selection.kv_blocks must be [Bs, Hs, nQ, Kmax], got {_shape(kb)}"
        )
    bs, hs, n_q, _ = _shape(kb)
    if n_q * bq < t or (n_q - 1) * bq >= t:
        raise KernelInputError(
            f"{name}: selection has nQ={n_q} query blocks of block_q={bq} (padded length {n_q * bq}) "
            f"but T={t} needs ceil(T/block_q)={math.ceil(t / bq)}; rebuild the selection for T={t}"
        )
    _batch_ok(name, "kv_blocks", bs, b)
    if hs not in (1, h):
        raise KernelInputError(
            f"{name}: selection.kv_blocks has Hs={hs} heads; use 1 (shared) or H={h}"
        )
    _expect(name, "counts", sel.counts, (bs, hs, n_q))
    if sel.full_counts is not None:
        _expect(name, "full_counts", sel.full_counts, (bs, hs, n_q))
    _expect_rows(name, "q_positions", sel.q_positions, b, t)
    _expect_rows(name, "k_positions", sel.k_positions, b, s)
    if (sel.q_segment_ids is None) != (sel.k_segment_ids is None):
        raise KernelInputError(
            f"{name}: selection has only one of q_segment_ids / k_segment_ids; give both or neither"
        )
    if sel.q_segment_ids is not None:
        _expect_rows(name, "q_segment_ids", sel.q_segment_ids, b, t)
        _expect_rows(name, "k_segment_ids", sel.k_segment_ids, b, s)
    if sel.extra_k is not None:
        e = sel.n_extra
        for arg in ("extra_k", "extra_v"):
            x = getattr(sel, arg)
            if x is None or x.ndim != 4 or x.shape[0] not in (1, b) or _shape(x)[1:] != (e, g, d):
                raise KernelInputError(
                    f"{name}: selection.{arg} must be [1 or B, E={e}, G={g}, D={d}], got {None if x is None else _shape(x)}"
                )
        if sel.extra_positions is None:
            raise KernelInputError(f"{name}: selection.extra_positions is required with extra_k")
        _expect_rows(name, "extra_positions", sel.extra_positions, b, e)
        if sel.q_segment_ids is not None:
            if sel.extra_segment_ids is None:
                raise KernelInputError(
                    f"{name}: selection.extra_segment_ids is required when segment ids are used"
                )
            _expect_rows(name, "extra_segment_ids", sel.extra_segment_ids, b, e)
    if sel.kv_shift is not None:
        _expect(name, "kv_shift", sel.kv_shift, _shape(kb))
        if d % 2 or sel.rope_inv_freq is None or _shape(sel.rope_inv_freq) != (d // 2,):
            raise KernelInputError(
                f"{name}: selection.kv_shift needs rope_inv_freq of shape ({d // 2},) and an even head dim, "
                f"got {None if sel.rope_inv_freq is None else _shape(sel.rope_inv_freq)} with D={d}"
            )
    if sel.q_blocks is not None:
        n_kv = sel.n_kv_blocks
        qb = sel.q_blocks
        if qb.ndim != 4 or _shape(qb)[:3] != (bs, hs, n_kv):
            raise KernelInputError(
                f"{name}: selection.q_blocks must be [{bs}, {hs}, nK+nE={n_kv}, Qmax], got {_shape(qb)}"
            )
        _expect(name, "q_slots", sel.q_slots, _shape(qb))
        _expect(name, "q_counts", sel.q_counts, (bs, hs, n_kv))
        _expect(name, "q_full_counts", sel.q_full_counts, (bs, hs, n_kv))
    if sel.window is not None and sel.window <= 0:
        raise KernelInputError(f"{name}: selection.window={sel.window} must be positive or None")
    if sel.extra_span is not None and sel.extra_span <= 0:
        raise KernelInputError(
            f"{name}: selection.extra_span={sel.extra_span} must be positive or None"
        )
    if softcap is not None and softcap <= 0:
        raise KernelInputError(f"{name}: softcap={softcap} must be positive or None")


def _batch_ok(name, arg, n, b):
    if n not in (1, b):
        raise KernelInputError(f"{name}: selection.{arg} has batch {n}; use 1 (shared) or B={b}")


def _expect(name, arg, x, shape):
    if x is None or _shape(x) != tuple(shape):
        raise KernelInputError(
            f"{name}: selection.{arg} must have shape {tuple(shape)}, got {None if x is None else _shape(x)}"
        )


def _expect_rows(name, arg, x, b, n):
    if x is None or x.ndim != 2 or x.shape[0] not in (1, b) or x.shape[1] != n:
        raise KernelInputError(
            f"{name}: selection.{arg} must be [1 or B={b}, {n}], got {None if x is None else _shape(x)}; "
            "build the selection from the same positions as q/k"
        )
