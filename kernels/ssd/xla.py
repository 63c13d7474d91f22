"""Chunked SSD in XLA: the state-space-duality algorithm of Mamba-2 (Dao & Gu, 2024, sec. 6).

Per chunk of C tokens: the intra-chunk output as a masked quadratic form (attention-like, with the
decay matrix L[t, s] = exp(sum_{s<r<=t} dt_r A)), the chunk's final state, the inter-chunk state
passing as a linear recurrence over chunks, and the off-diagonal output read from the state
entering each chunk. Segment ids cut every decay that crosses a document boundary.
The preparation and state-passing helpers here are shared with pallas_triton.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.ssd.reference import segment_resets

_F32 = jnp.float32


def dot_precision(dtype) -> jax.lax.Precision:
    """Full-precision f32 dots (the recurrence compounds error); bf16/f16 operands use the MXU/MMA."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class Chunked(NamedTuple):
    """Inputs padded to whole chunks plus the per-token decay weights every chunked path needs.

    Shapes use Tp = n_chunks * chunk. Weights are float32; `doc_BT` numbers documents from 0
    (the initial state belongs to document 0)."""

    x_BTHP: jax.Array
    dt_BTH: jax.Array  # f32, zero on padding (padding neither decays nor feeds the state)
    B_BTGN: jax.Array
    C_BTGN: jax.Array
    acum_BTH: jax.Array  # cumulative dt*A within each chunk (<= 0, non-increasing)
    doc_BT: jax.Array | None  # int32 document index, None without segment ids
    w_out_BTH: jax.Array  # dt_s * exp(acum_last - acum_s) * [doc_s == doc_last]: token -> chunk state
    carry_in_BTH: jax.Array  # exp(acum_t) * [doc_t == doc of the previous chunk's last token]
    chunk_decay_BcH: jax.Array  # carry_in at each chunk's last token: state -> next state
    T: int
    chunk: int


def prepare(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, segment_ids_BT, chunk: int) -> Chunked:
    """Pad to whole chunks and compute the decay weights (all O(T H), cheap next to the dots)."""
    batch, T, H, _ = x_BTHP.shape
    nc = max(1, math.ceil(T / chunk))
    pad = nc * chunk - T

    def padT(a):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a

    x_BTHP, B_BTGN, C_BTGN = padT(x_BTHP), padT(B_BTGN), padT(C_BTGN)
    dt_BTH = padT(dt_BTH.astype(_F32))
    Tp = nc * chunk

    a_BcLH = (dt_BTH * A_H.astype(_F32)).reshape(batch, nc, chunk, H)
    acum_BcLH = jnp.cumsum(a_BcLH, axis=2)
    last_BcH = acum_BcLH[:, :, -1, :]

    if segment_ids_BT is None:
        doc_BT = None
        same_last_BcL = same_prev_BcL = None
    else:
        # Documents are runs of equal ids (a change starts a new one), so [1, 1, 2, 1] has three.
        reset_BT = segment_resets(segment_ids_BT, T, batch)
        doc_BT = jnp.cumsum(reset_BT.astype(jnp.int32), axis=1)
        if pad:  # padding continues the last document: no reset, no input
            doc_BT = jnp.pad(doc_BT, [(0, 0), (0, pad)], mode="edge")
        doc_BcL = doc_BT.reshape(batch, nc, chunk)
        doc_last_Bc = doc_BcL[:, :, -1]
        doc_prev_Bc = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), doc_last_Bc[:, :-1]], axis=1)
        same_last_BcL = doc_BcL == doc_last_Bc[:, :, None]
        same_prev_BcL = doc_BcL == doc_prev_Bc[:, :, None]

    # exp of non-positive numbers only: no overflow, and masked terms are exact zeros.
    w_out_BcLH = jnp.exp(last_BcH[:, :, None, :] - acum_BcLH)
    w_out_BcLH = w_out_BcLH * dt_BTH.reshape(batch, nc, chunk, H)
    carry_BcLH = jnp.exp(acum_BcLH)
    if segment_ids_BT is not None:
        w_out_BcLH = jnp.where(same_last_BcL[..., None], w_out_BcLH, 0.0)
        carry_BcLH = jnp.where(same_prev_BcL[..., None], carry_BcLH, 0.0)
    chunk_decay_BcH = carry_BcLH[:, :, -1, :]
    return Chunked(
        x_BTHP=x_BTHP, dt_BTH=dt_BTH, B_BTGN=B_BTGN, C_BTGN=C_BTGN,
        acum_BTH=acum_BcLH.reshape(batch, Tp, H), doc_BT=doc_BT,
        w_out_BTH=w_out_BcLH.reshape(batch, Tp, H), carry_in_BTH=carry_BcLH.reshape(batch, Tp, H),
        chunk_decay_BcH=chunk_decay_BcH, T=T, chunk=chunk,
    )


def pass_states(chunk_decay_Bc, states_Bc, initial_state_B, *, parallel: bool | None = None):
    """h_c = decay_c h_{c-1} + S_c with h_{-1} = initial state, over the chunk axis (axis 1).

    chunk_decay_Bc broadcasts against states_Bc ([B, nc, ...state axes]); initial_state_B is
    [B, ...state axes]. parallel: associative scan (log depth: accelerators, where a sequential
    loop costs a launch per chunk) or lax.scan (CPU: fewer passes over the states, much faster to
    compile); None picks by backend. Returns (state entering each chunk, final state), float32."""
    parallel = jax.default_backend() != "cpu" if parallel is None else parallel
    h0 = initial_state_B.astype(_F32)
    states_Bc = states_Bc.astype(_F32)
    chunk_decay_Bc = chunk_decay_Bc.astype(_F32)
    if parallel:
        def combine(left, right):
            a_l, s_l = left
            a_r, s_r = right
            return a_l * a_r, a_r * s_l + s_r

        acc_decay, acc_state = jax.lax.associative_scan(combine, (chunk_decay_Bc, states_Bc), axis=1)
        h_Bc = acc_decay * h0[:, None] + acc_state
        return jnp.concatenate([h0[:, None], h_Bc[:, :-1]], axis=1), h_Bc[:, -1]

    def step(h, inputs):
        decay, s = inputs
        return decay * h + s, h

    final, h_prev_cB = jax.lax.scan(step, h0, (jnp.moveaxis(chunk_decay_Bc, 1, 0), jnp.moveaxis(states_Bc, 1, 0)))
    return jnp.moveaxis(h_prev_cB, 0, 1), final


def _bmm(a, b, *, prec, n_batch: int):
    """Batched matmul over the first n_batch axes, flattened to one: XLA:CPU runs a dot with a
    single batch axis several times faster than one with four."""
    lead = a.shape[:n_batch]
    out = jnp.matmul(a.reshape(-1, *a.shape[n_batch:]), b.reshape(-1, *b.shape[n_batch:]),
                     precision=prec, preferred_element_type=_F32)
    return out.reshape(*lead, *out.shape[1:])


# On CPU, tokens per block of the outer sequential loop: the block's quadratic-form and state
# intermediates (~2 MB at H=8, P=N=64) then stay in cache, so time grows linearly in T instead of
# degrading once whole-sequence intermediates spill to DRAM. Accelerators run one block.
_CPU_BLOCK_CHUNKS = 16


def ssd_xla(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H=None, initial_state_BHPN=None,
            segment_ids_BT=None, *, chunk: int = 64, block_chunks: int | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD. Shapes as kernels.ssd.ssd; returns (y [B,T,H,P] in x's dtype, final state f32).

    block_chunks: process the sequence in blocks of this many chunks under lax.scan, carrying the
    state (None: 16 on CPU, one block elsewhere). Same result; bounded working set."""
    batch, T, H, P = x_BTHP.shape
    N = B_BTGN.shape[-1]
    if block_chunks is None:
        block_chunks = _CPU_BLOCK_CHUNKS if jax.default_backend() == "cpu" else None
    h0_BHPN = (jnp.zeros((batch, H, P, N), _F32) if initial_state_BHPN is None
               else initial_state_BHPN.astype(_F32))
    blk = None if block_chunks is None else block_chunks * chunk
    if blk is None or T <= blk:
        y_BTHP, final_BHPN = _ssd_chunked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, h0_BHPN, segment_ids_BT,
                                          chunk)
    else:
        y_BTHP, final_BHPN = _ssd_blocked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, h0_BHPN, segment_ids_BT,
                                          chunk, blk)
    if D_H is not None:
        y_BTHP = y_BTHP + D_H.astype(_F32)[:, None] * x_BTHP.astype(_F32)
    return y_BTHP.astype(x_BTHP.dtype), final_BHPN


def _ssd_blocked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, h0_BHPN, segment_ids_BT, chunk, blk):
    """_ssd_chunked over blocks of `blk` tokens in sequence, the state carried between blocks."""
    batch, T = x_BTHP.shape[:2]
    nb = math.ceil(T / blk)
    pad = nb * blk - T

    def blocks(a, mode="constant"):  # [B, T, ...] -> [nb, B, blk, ...]; padding: no input, no decay
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode) if pad else a
        return jnp.moveaxis(a.reshape(batch, nb, blk, *a.shape[2:]), 1, 0)

    seg_BT = jnp.zeros((batch, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    seg_nBL = blocks(seg_BT, mode="edge")
    prev_last_nB = jnp.concatenate([seg_nBL[:1, :, 0], seg_nBL[:-1, :, -1]], axis=0)
    xs = (blocks(x_BTHP), blocks(dt_BTH), blocks(B_BTGN), blocks(C_BTGN), seg_nBL, prev_last_nB)

    def body(h_BHPN, inputs):
        x, dt, B, C, seg, prev_last = inputs
        # The carried state belongs to the previous block's last document: drop it at a boundary.
        h_BHPN = jnp.where((seg[:, 0] != prev_last)[:, None, None, None], 0.0, h_BHPN)
        y, h_BHPN = _ssd_chunked(x, dt, A_H, B, C, h_BHPN, None if segment_ids_BT is None else seg, chunk)
        return h_BHPN, y

    final_BHPN, y_nBLHP = jax.lax.scan(body, h0_BHPN, xs)
    y_BTHP = jnp.moveaxis(y_nBLHP, 0, 1).reshape(batch, nb * blk, *x_BTHP.shape[2:])[:, :T]
    return y_BTHP, final_BHPN


def _ssd_chunked(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, h0_BHPN, segment_ids_BT, chunk):
    """The SSD algorithm on one block: (y [B, T, H, P] f32 without the D skip, final state f32)."""
    batch, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    R = H // G
    cdt = x_BTHP.dtype  # dot operand dtype; accumulation and decays are f32
    prec = dot_precision(cdt)
    c = prepare(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, segment_ids_BT, chunk)
    nc = c.x_BTHP.shape[1] // chunk
    L = chunk

    def chunks(a, *trailing):
        return a.reshape(batch, nc, L, *trailing)

    # Inside a chunk: time-major x [.., G, L, R*P] for the state dots, head-major x [.., G, R, L, P]
    # for the quadratic form; every dot is then a batched matmul over one flattened batch axis.
    x_BcGLRP = jnp.transpose(chunks(c.x_BTHP, G, R, P), (0, 1, 3, 2, 4, 5))
    x_BcGRLP = jnp.transpose(x_BcGLRP, (0, 1, 2, 4, 3, 5))
    B_BcGLN = jnp.transpose(chunks(c.B_BTGN.astype(cdt), G, N), (0, 1, 3, 2, 4))
    C_BcGLN = jnp.transpose(chunks(c.C_BTGN.astype(cdt), G, N), (0, 1, 3, 2, 4))

    def group_major(a_BTH):  # [B, Tp, H] -> [B, nc, G, L, R]
        return jnp.transpose(chunks(a_BTH, G, R), (0, 1, 3, 2, 4))

    dt_BcGRL = jnp.swapaxes(group_major(c.dt_BTH), -1, -2)
    acum_BcGRL = jnp.swapaxes(group_major(c.acum_BTH), -1, -2)

    # 1. Intra-chunk (diagonal blocks): y_t = sum_{s<=t} (C_t . B_s) L[t, s] dt_s x_s.
    CB_BcGLS = _bmm(C_BcGLN, jnp.swapaxes(B_BcGLN, -1, -2), prec=prec, n_batch=3)
    diff_BcGRLS = acum_BcGRL[..., :, None] - acum_BcGRL[..., None, :]
    mask_LS = jnp.tril(jnp.ones((L, L), bool))
    if c.doc_BT is not None:
        doc_BcL = c.doc_BT.reshape(batch, nc, L)
        mask = (mask_LS & (doc_BcL[..., :, None] == doc_BcL[..., None, :]))[:, :, None, None]
    else:
        mask = mask_LS
    decay_BcGRLS = jnp.exp(jnp.where(mask, diff_BcGRLS, -jnp.inf))
    M_BcGRLS = CB_BcGLS[:, :, :, None] * decay_BcGRLS * dt_BcGRL[..., None, :]
    y_BcGRLP = _bmm(M_BcGRLS.astype(cdt), x_BcGRLP, prec=prec, n_batch=4)

    # 2. Each chunk's own final state, kept as S^T [.., G, N, R*P]: S^T = B^T (w_out o x).
    xw_BcGLRP = (x_BcGLRP.astype(_F32) * group_major(c.w_out_BTH)[..., None]).astype(cdt)
    S_BcGNRP = _bmm(jnp.swapaxes(B_BcGLN, -1, -2), xw_BcGLRP.reshape(batch, nc, G, L, R * P),
                    prec=prec, n_batch=3).reshape(batch, nc, G, N, R, P)

    # 3. State passing across chunks (in the [G, N, R, P] layout; decays broadcast over N, P).
    h0_BGNRP = jnp.transpose(h0_BHPN.reshape(batch, G, R, P, N), (0, 1, 4, 2, 3))
    decay_BcG1R1 = c.chunk_decay_BcH.reshape(batch, nc, G, 1, R, 1)
    h_prev_BcGNRP, final_BGNRP = pass_states(decay_BcG1R1, S_BcGNRP, h0_BGNRP)
    final_BHPN = jnp.transpose(final_BGNRP, (0, 1, 3, 4, 2)).reshape(batch, H, P, N)

    # 4. Off-diagonal: the state entering the chunk, read by C_t and decayed to t.
    y_off_BcGLRP = _bmm(C_BcGLN, h_prev_BcGNRP.reshape(batch, nc, G, N, R * P).astype(cdt),
                        prec=prec, n_batch=3).reshape(batch, nc, G, L, R, P)
    y_off_BcGLRP = y_off_BcGLRP * group_major(c.carry_in_BTH)[..., None]
    y_BcLGRP = (jnp.transpose(y_BcGRLP, (0, 1, 4, 2, 3, 5))
                + jnp.transpose(y_off_BcGLRP, (0, 1, 3, 2, 4, 5)))

    return y_BcLGRP.reshape(batch, nc * L, H, P)[:, :T], final_BHPN
