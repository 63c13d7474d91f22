"""kernels.ssd.ssd: the public Mamba-2 SSD scan (validation, dispatch, custom VJP for Pallas).

implementation: None picks "pallas" on a GPU (when the chunk suits Triton: a power of two >= 16)
and "xla" elsewhere; "reference" is the sequential lax.scan specification.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.dispatch import IMPLEMENTATIONS
from kernels.dispatch import resolve_implementation as _resolve
from kernels.errors import KernelInputError
from kernels.ssd.pallas_triton import PallasConfig, ssd_pallas
from kernels.ssd.reference import ssd_reference
from kernels.ssd.xla import ssd_xla

DEFAULT_CHUNK = 64


def _pallas_chunk_ok(chunk: int) -> bool:
    return chunk >= 16 and chunk & (chunk - 1) == 0


def resolve_implementation(implementation: str | None, chunk: int = DEFAULT_CHUNK,
                           interpret: bool = False) -> str:
    """The implementation `ssd(..., implementation=implementation, chunk=chunk)` runs."""
    return _resolve("ssd", implementation, interpret, pallas_ok=_pallas_chunk_ok(chunk))


def _shape(a) -> tuple:
    return tuple(getattr(a, "shape", ()))


def _validate(x, dt, A, B, C, D, initial_state, segment_ids, chunk, implementation, interpret):
    resolve_implementation(implementation)  # an unknown name is a KernelInputError
    if getattr(x, "ndim", None) != 4:
        raise KernelInputError(f"ssd: x must be [batch, T, heads, head_dim], got shape {_shape(x)}")
    batch, T, H, P = x.shape
    if _shape(dt) != (batch, T, H):
        raise KernelInputError(f"ssd: dt shape {_shape(dt)} does not fit x {x.shape}; "
                               f"expected [batch, T, heads] = {(batch, T, H)}")
    if _shape(A) != (H,):
        raise KernelInputError(f"ssd: A shape {_shape(A)} does not fit x's {H} heads; expected ({H},)")
    if getattr(B, "ndim", None) != 4 or B.shape[:2] != (batch, T):
        raise KernelInputError(f"ssd: B shape {_shape(B)} must be [batch, T, groups, state] = "
                               f"[{batch}, {T}, G, N] to fit x {x.shape}")
    if _shape(C) != B.shape:
        raise KernelInputError(f"ssd: C shape {_shape(C)} must equal B shape {B.shape}")
    G, N = B.shape[2:]
    if G < 1 or H % G:
        raise KernelInputError(f"ssd: groups G={G} (axis 2 of B and C) must divide heads H={H}; "
                               "pick G among the divisors of H")
    if D is not None and _shape(D) != (H,):
        raise KernelInputError(f"ssd: D shape {_shape(D)} does not fit x's {H} heads; expected ({H},)")
    if initial_state is not None and _shape(initial_state) != (batch, H, P, N):
        raise KernelInputError(f"ssd: initial_state shape {_shape(initial_state)} does not fit; "
                               f"expected [batch, heads, head_dim, state] = {(batch, H, P, N)}")
    if segment_ids is not None:
        if _shape(segment_ids) != (batch, T):
            raise KernelInputError(f"ssd: segment_ids shape {_shape(segment_ids)} must be [batch, T] = "
                                   f"{(batch, T)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise KernelInputError(f"ssd: segment_ids dtype {segment_ids.dtype} must be an integer type")
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise KernelInputError(f"ssd: {name} dtype {a.dtype} must be floating point")
    if not isinstance(chunk, int) or chunk < 1:
        raise KernelInputError(f"ssd: chunk={chunk!r} must be a positive int (default {DEFAULT_CHUNK})")
    if implementation == "pallas":
        if not _pallas_chunk_ok(chunk):
            raise KernelInputError(f"ssd: chunk={chunk} is not usable by the Pallas kernel; use a power "
                                   "of two >= 16 (e.g. 64) or implementation='xla'")
        if not interpret and jax.default_backend() != "gpu":
            raise KernelInputError(f"ssd: implementation='pallas' needs a GPU (backend is "
                                   f"{jax.default_backend()!r}); pass interpret=True to run it on CPU, "
                                   "or use implementation='xla'")


# Jitted entry points: eager callers compile once per shape instead of once per primitive; under an
# outer jit they are inlined.
_reference_jit = jax.jit(ssd_reference)
_xla_jit = jax.jit(ssd_xla, static_argnames=("chunk",))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _ssd_pallas_vjp(x, dt, A, B, C, D, h0, seg, chunk, interpret, has_seg):
    return ssd_pallas(x, dt, A, B, C, D, h0, seg if has_seg else None, chunk=chunk, interpret=interpret)


def _fwd(x, dt, A, B, C, D, h0, seg, chunk, interpret, has_seg):
    out = _ssd_pallas_vjp(x, dt, A, B, C, D, h0, seg, chunk, interpret, has_seg)
    return out, (x, dt, A, B, C, D, h0, seg)


def _bwd(chunk, interpret, has_seg, res, cotangents):
    # Recompute-based VJP: differentiate the XLA chunked path (same algorithm, same numbers).
    x, dt, A, B, C, D, h0, seg = res

    def f(*diff_args):
        return ssd_xla(*diff_args, seg if has_seg else None, chunk=chunk)

    _, vjp = jax.vjp(f, x, dt, A, B, C, D, h0)
    return (*vjp(cotangents), None)


_ssd_pallas_vjp.defvjp(_fwd, _bwd)
_pallas_jit = jax.jit(_ssd_pallas_vjp, static_argnums=(8, 9, 10))


def ssd(x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None, chunk: int | None = None,
        implementation: str | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 selective scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t.

    Args:
      x: [B, T, H, P] inputs per head.            dt: [B, T, H] step sizes, already positive.
      A: [H] decay rates, negative.               B, C: [B, T, G, N], shared by the H/G heads of a group.
      D: [H] skip, optional.                      initial_state: [B, H, P, N], optional (zeros).
      segment_ids: [B, T] ints; the state is reset to zero where the id changes (the initial state
        flows into the segment of token 0). chunk: chunk length of the xla/pallas paths (default 64).
      implementation: None | "reference" | "xla" | "pallas"; interpret runs Pallas on CPU.
    Returns:
      (y [B, T, H, P] in x's dtype, final_state [B, H, P, N] float32): the state after the last
      token, to continue with (streaming, decoding).
    """
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    _validate(x, dt, A, B, C, D, initial_state, segment_ids, chunk, implementation, interpret)
    impl = resolve_implementation(implementation, chunk, interpret)
    if impl == "reference":
        return _reference_jit(x, dt, A, B, C, D, initial_state, segment_ids)
    if impl == "xla":
        return _xla_jit(x, dt, A, B, C, D, initial_state, segment_ids, chunk=chunk)
    batch, T, H, P = x.shape
    N = B.shape[-1]
    D_ = jnp.zeros((H,), jnp.float32) if D is None else D
    h0 = jnp.zeros((batch, H, P, N), jnp.float32) if initial_state is None else initial_state
    has_seg = segment_ids is not None
    seg = segment_ids if has_seg else jnp.zeros((batch, T), jnp.int32)
    return _pallas_jit(x, dt, A, B, C, D_, h0, seg, chunk, interpret, has_seg)


__all__ = ["DEFAULT_CHUNK", "IMPLEMENTATIONS", "PallasConfig", "resolve_implementation", "ssd"]
