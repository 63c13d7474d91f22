"""Chunked SSD forward in Pallas (Triton lowering) for GPUs (Mamba-2, Dao & Gu, 2024, sec. 6-7).

Two kernels over a (batch, chunk, head) grid, so every chunk of every head runs in parallel:
`_chunk_state_kernel` writes each chunk's own final state S = (x * w)^T B, and `_chunk_scan_kernel`
writes y = (C B^T o L o dt) x + carry_in * C h_prev^T. The O(T H) preparation (cumulative decays,
document masks) and the O(T/C) state passing between the two run in XLA (kernels.ssd.xla).
The backward pass recomputes through the XLA chunked path (kernels.ssd.api wires the custom_vjp).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.ssd.xla import dot_precision, pass_states, prepare

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Launch parameters of both kernels (the chunk length is the block along time)."""

    num_warps: int = 4
    num_stages: int = 1


def _pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def _chunk_state_kernel(x_ref, w_ref, b_ref, s_ref, *, prec):
    # x [L, P], w [L], b [L, N] -> s [P, N]: the chunk's inputs decayed to its last token.
    x = x_ref[...]
    xw = (x.astype(_F32) * w_ref[...][:, None]).astype(x.dtype)
    s_ref[...] = jax.lax.dot_general(xw, b_ref[...], (((0,), (0,)), ((), ())), precision=prec,
                                     preferred_element_type=_F32)


def _chunk_scan_kernel(*refs, chunk: int, has_doc: bool, prec):
    if has_doc:
        x_ref, dt_ref, acum_ref, carry_ref, b_ref, c_ref, h_ref, doc_ref, y_ref = refs
    else:
        x_ref, dt_ref, acum_ref, carry_ref, b_ref, c_ref, h_ref, y_ref = refs
    x, b, c = x_ref[...], b_ref[...], c_ref[...]
    acum = acum_ref[...]
    cb = jax.lax.dot_general(c, b, (((1,), (1,)), ((), ())), precision=prec,
                             preferred_element_type=_F32)  # [L, L]: C_t . B_s
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    mask = row >= col
    if has_doc:
        doc = doc_ref[...]
        mask = mask & (doc[:, None] == doc[None, :])
    # exp of non-positive entries only; masked ones become exact zeros.
    decay = jnp.exp(jnp.where(mask, acum[:, None] - acum[None, :], -jnp.inf))
    m = cb * decay * dt_ref[...][None, :]
    y = jnp.dot(m.astype(x.dtype), x, precision=prec, preferred_element_type=_F32)
    h = h_ref[...].astype(x.dtype)  # [P, N], the state entering this chunk
    y_off = jax.lax.dot_general(c, h, (((1,), (1,)), ((), ())), precision=prec,
                                preferred_element_type=_F32)  # [L, P]
    y_ref[...] = (y + y_off * carry_ref[...][:, None]).astype(y_ref.dtype)


def ssd_pallas(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H=None, initial_state_BHPN=None,
               segment_ids_BT=None, *, chunk: int = 64, interpret: bool = False,
               config: PallasConfig = PallasConfig()) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD forward with Pallas kernels. `chunk` must be a power of two >= 16 (api checks).

    Returns (y [B,T,H,P] in x's dtype, final state [B,H,P,N] float32)."""
    batch, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    R = H // G
    cdt = x_BTHP.dtype
    prec = dot_precision(cdt)
    # Triton blocks are powers of two >= 16; zero padding of P and N changes nothing in the result.
    Pp, Np = _pow2_at_least(P), _pow2_at_least(N)
    xk = jnp.pad(x_BTHP, [(0, 0)] * 3 + [(0, Pp - P)]) if Pp != P else x_BTHP
    Bk = jnp.pad(B_BTGN, [(0, 0)] * 3 + [(0, Np - N)]) if Np != N else B_BTGN
    Ck = jnp.pad(C_BTGN, [(0, 0)] * 3 + [(0, Np - N)]) if Np != N else C_BTGN
    c = prepare(xk, dt_BTH, A_H, Bk.astype(cdt), Ck.astype(cdt), segment_ids_BT, chunk)
    Tp = c.x_BTHP.shape[1]
    nc = Tp // chunk
    L = chunk
    grid = (batch, nc, H)
    params = {
        "grid": grid, "interpret": interpret,
        "compiler_params": plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
    }
    x_spec = pl.BlockSpec((None, L, None, Pp), lambda b, k, h: (b, k, h, 0))
    bc_spec = pl.BlockSpec((None, L, None, Np), lambda b, k, h: (b, k, h // R, 0))
    tok_spec = pl.BlockSpec((None, L, None), lambda b, k, h: (b, k, h))
    state_spec = pl.BlockSpec((None, None, None, Pp, Np), lambda b, k, h: (b, k, h, 0, 0))

    states_BcHPN = pl.pallas_call(
        functools.partial(_chunk_state_kernel, prec=prec),
        out_shape=jax.ShapeDtypeStruct((batch, nc, H, Pp, Np), _F32),
        in_specs=[x_spec, tok_spec, bc_spec], out_specs=state_spec, **params,
    )(c.x_BTHP, c.w_out_BTH, c.B_BTGN)

    if initial_state_BHPN is None:
        h0 = jnp.zeros((batch, H, Pp, Np), _F32)
    else:
        h0 = jnp.pad(initial_state_BHPN.astype(_F32), [(0, 0), (0, 0), (0, Pp - P), (0, Np - N)])
    h_prev_BcHPN, final_BHPN = pass_states(c.chunk_decay_BcH[..., None, None], states_BcHPN, h0)

    has_doc = c.doc_BT is not None
    in_specs = [x_spec, tok_spec, tok_spec, tok_spec, bc_spec, bc_spec, state_spec]
    args = [c.x_BTHP, c.dt_BTH, c.acum_BTH, c.carry_in_BTH, c.B_BTGN, c.C_BTGN, h_prev_BcHPN]
    if has_doc:
        in_specs.append(pl.BlockSpec((None, L), lambda b, k, h: (b, k)))
        args.append(c.doc_BT)
    y_BTHP = pl.pallas_call(
        functools.partial(_chunk_scan_kernel, chunk=L, has_doc=has_doc, prec=prec),
        out_shape=jax.ShapeDtypeStruct((batch, Tp, H, Pp), _F32),
        in_specs=in_specs, out_specs=x_spec, **params,
    )(*args)

    y_BTHP = y_BTHP[:, :T, :, :P]
    if D_H is not None:
        y_BTHP = y_BTHP + D_H.astype(_F32)[:, None] * x_BTHP.astype(_F32)
    return y_BTHP.astype(cdt), final_BHPN[:, :, :P, :N]
