"""Pallas (Triton) block-scaled matmul: out[M, N] = a[M, K] . b[N, K]^T with E2M1 / E4M3 / E5M2
elements and E4M3 / E8M0 block scales decoded in registers, fp32 accumulation, tensor scales on the
output. Formats: NVIDIA NVFP4 (2025) and OCP Microscaling MXFP4/MXFP8 (v1.0, 2023).

Each operand is either high precision (weight-only quantization) or quantized (codes one per byte,
or two E2M1 codes per byte). A decoded element times its block scale is exact in bf16, so the
quantized tiles feed a bf16 tensor-core dot (fp32 when the other operand is fp32), which gives the
reference's numbers up to summation order.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.qmatmul import codecs
from kernels.qmatmul.config import MatmulConfig

# Output tiles of one group share their a-panel in L2 (Triton's grouped ordering).
_GROUP_M = 8


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """Static description of one operand as the kernel reads it.

    kind: "dense" (a float array) or "quant" (codes + block scales).
    element: "e2m1" | "e4m3" | "e5m2"; scale: "e4m3" | "e8m0" | "none" (no block scales: codes
    only); block: (rows, k) per scale.
    packed: E2M1 codes two per byte along K (element 2i in the low nibble).
    """

    kind: str
    element: str = ""
    scale: str = ""
    block: tuple[int, int] = (1, 1)
    packed: bool = False


def _decode_elements(c, element: str, decode: str):
    """Decoded elements and the power of two they still owe (folded into the block scale).

    decode "f32": exact integer/bitcast decoders (codecs), float32 out.
    decode "fp8": the hardware fp8 -> bf16 conversion (sm_89+). E2M1 code bits moved into an E4M3
      byte (sign to bit 7, exponent+mantissa to bits 4..2) decode to exactly value * 2^-6, the
      subnormal 0.5 included, so a shift-and-or plus the conversion decodes them.
    decode "bf16": E2M1 straight to bf16 bits (normal codes carry exponent+mantissa into the bf16
      exponent and top mantissa bit; 0 and 0.5 by select), then a same-width bitcast; other
      element formats as "fp8".
    """
    if decode == "f32":
        return codecs.DECODE[element](c), 1.0
    if element == "e2m1" and decode == "bf16":
        ci = c.astype(jnp.int32)
        mag = ci & 7
        bits = jnp.where(mag < 2, mag * 0x3F00, (mag << 6) + 0x3F00) | ((ci & 8) << 12)
        return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16), 1.0
    if element == "e2m1":
        bits = ((c & 8) << 4) | ((c & 7) << 2)
        return lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.bfloat16), 64.0
    dtype = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}[element]
    return lax.bitcast_convert_type(c, dtype).astype(jnp.bfloat16), 1.0


# ----------------------------------------------------------------------------- the kernel


def _load_tile(
    spec: OperandSpec,
    refs,
    tile_idx,
    n_rows: int,
    k: int,
    k0,
    *,
    tile_rows: int,
    block_k: int,
    compute_dtype,
    cfg: MatmulConfig,
):
    """One [tile_rows, block_k] tile of an operand in compute_dtype, block scales applied, zeros
    outside the array (so ragged edges add nothing to the dot)."""
    rows = tile_idx * tile_rows + jnp.arange(tile_rows)
    row_ok = rows < n_rows
    if spec.kind == "dense":
        (x_ref,) = refs
        cols_ok = k0 + jnp.arange(block_k) < k
        x = plgpu.load(
            x_ref.at[:, pl.ds(k0, block_k)], mask=row_ok[:, None] & cols_ok[None, :], other=0
        )
        return x.astype(compute_dtype)

    codes_ref = refs[0]
    if spec.packed:
        half = block_k // 2
        cols_ok = k0 // 2 + jnp.arange(half) < k // 2
        p = plgpu.load(
            codes_ref.at[:, pl.ds(k0 // 2, half)], mask=row_ok[:, None] & cols_ok[None, :], other=0
        )
        if cfg.unpack == "split" and spec.block[1] >= 2:
            # Even and odd elements stay apart (no interleave); the caller splits the other operand
            # the same way and takes two half-depth dots.
            s = _load_scales(
                spec, refs[1], tile_idx, n_rows, k, k0, tile_rows=tile_rows, block_k=block_k
            )
            half_block = (spec.block[0], spec.block[1] // 2)
            return tuple(
                _scaled(c, spec, s, half_block, tile_rows, half, compute_dtype, cfg)
                for c in (p & 0xF, p >> 4)
            )
        c = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(tile_rows, block_k)
    else:
        cols_ok = k0 + jnp.arange(block_k) < k
        c = plgpu.load(
            codes_ref.at[:, pl.ds(k0, block_k)], mask=row_ok[:, None] & cols_ok[None, :], other=0
        )
    if spec.scale == "none":  # per-tensor scaled (fp8): the scale rides on the tensor scale
        vals, owed = _decode_elements(c, spec.element, cfg.decode)
        return (vals * owed).astype(compute_dtype) if owed != 1.0 else vals.astype(compute_dtype)
    s = _load_scales(spec, refs[1], tile_idx, n_rows, k, k0, tile_rows=tile_rows, block_k=block_k)
    return _scaled(c, spec, s, spec.block, tile_rows, block_k, compute_dtype, cfg)


def _load_scales(
    spec: OperandSpec,
    scales_ref,
    tile_idx,
    n_rows: int,
    k: int,
    k0,
    *,
    tile_rows: int,
    block_k: int,
):
    """The [tile_rows / br, block_k / bk] block scales of a tile, decoded to float32."""
    br, bk = spec.block
    s_rows, s_cols = tile_rows // br, block_k // bk
    s_row_ok = tile_idx * s_rows + jnp.arange(s_rows) < -(-n_rows // br)
    s_col_ok = k0 // bk + jnp.arange(s_cols) < -(-k // bk)
    s = plgpu.load(
        scales_ref.at[:, pl.ds(k0 // bk, s_cols)],
        mask=s_row_ok[:, None] & s_col_ok[None, :],
        other=0,
    )
    return codecs.DECODE[spec.scale](s)


def _scaled(c, spec: OperandSpec, s, block, rows: int, cols: int, compute_dtype, cfg: MatmulConfig):
    """Decoded codes [rows, cols] times their block scales s (blocks of `block` over this tile)."""
    vals, owed = _decode_elements(c, spec.element, cfg.decode)
    if owed != 1.0:
        s = s * owed
    # element x scale has at most 6 significant bits: exact in bf16, so the product can be taken
    # in the narrow type when the tile goes to a bf16 dot.
    mul_dtype = (
        jnp.bfloat16
        if (vals.dtype == jnp.bfloat16 and compute_dtype == jnp.bfloat16)
        else jnp.float32
    )
    vals = codecs.blocked(vals.astype(mul_dtype), block) * codecs.per_block(
        s.astype(mul_dtype), block
    )
    return codecs.unblocked(vals, rows, cols).astype(compute_dtype)


def _even_odd(x):
    """(x[:, 0::2], x[:, 1::2]) of a [rows, cols] tile without strided access (tt.split)."""
    rows, cols = x.shape
    return tuple(lax.unstack(x.reshape(rows, cols // 2, 2), axis=2))


def _n_arrays(spec: OperandSpec) -> int:
    return 1 if spec.kind == "dense" or spec.scale == "none" else 2


def _swizzle(pid, grid_m: int, grid_n: int):
    """Program id -> (i, j) output tile, GROUP_M row tiles at a time (better L2 reuse)."""
    group = _GROUP_M * grid_n
    first_m = (pid // group) * _GROUP_M
    size_m = jnp.minimum(grid_m - first_m, _GROUP_M)
    i = first_m + (pid % group) % size_m
    j = (pid % group) // size_m
    return i, j


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _k_steps(k: int, cfg: MatmulConfig) -> int:
    """block_k steps per split of the contraction."""
    return pl.cdiv(pl.cdiv(k, cfg.block_k), cfg.split_k)


def _matmul_kernel(
    *refs, a_spec, b_spec, m, n, k, grid_m, grid_n, cfg: MatmulConfig, compute_dtype
):
    n_a, n_b = _n_arrays(a_spec), _n_arrays(b_spec)
    a_refs, b_refs = refs[:n_a], refs[n_a : n_a + n_b]
    ts_ref, o_ref = refs[n_a + n_b :]
    i, j = _swizzle(pl.program_id(0), grid_m, grid_n)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    steps = _k_steps(k, cfg)
    k_first = pl.program_id(1) * (steps * bk)  # split-K: this program's share of the contraction

    def body(step, acc):
        k0 = pl.multiple_of(k_first + step * bk, bk)
        a = _load_tile(
            a_spec,
            a_refs,
            i,
            m,
            k,
            k0,
            tile_rows=bm,
            block_k=bk,
            compute_dtype=compute_dtype,
            cfg=cfg,
        )
        b = _load_tile(
            b_spec,
            b_refs,
            j,
            n,
            k,
            k0,
            tile_rows=bn,
            block_k=bk,
            compute_dtype=compute_dtype,
            cfg=cfg,
        )
        if isinstance(a, tuple) or isinstance(b, tuple):
            (a_e, a_o), (b_e, b_o) = [t if isinstance(t, tuple) else _even_odd(t) for t in (a, b)]
            return acc + _dot(a_e, b_e) + _dot(a_o, b_o)
        return acc + _dot(a, b)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    acc = acc * ts_ref[0]
    rows_ok = i * bm + jnp.arange(bm) < m
    cols_ok = j * bn + jnp.arange(bn) < n
    plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=rows_ok[:, None] & cols_ok[None, :])


def _operand_specs(
    spec: OperandSpec, arrays, tile_rows: int, k: int, grid_m: int, grid_n: int, which: str
):
    """BlockSpecs for an operand's arrays: one row panel (all of K) per output tile row/column."""

    def rows_of(pid):
        i, j = _swizzle(pid, grid_m, grid_n)
        return i if which == "a" else j

    if spec.kind == "dense":
        return [pl.BlockSpec((tile_rows, k), lambda pid, s: (rows_of(pid), 0))]
    codes = arrays[0]
    specs = [pl.BlockSpec((tile_rows, codes.shape[1]), lambda pid, s: (rows_of(pid), 0))]
    if spec.scale != "none":
        br, _ = spec.block
        specs.append(
            pl.BlockSpec((tile_rows // br, arrays[1].shape[1]), lambda pid, s: (rows_of(pid), 0))
        )
    return specs


@functools.partial(
    jax.jit, static_argnames=("a_spec", "b_spec", "k", "cfg", "compute_dtype", "interpret")
)
def qmatmul_pallas(
    a_arrays,
    b_arrays,
    tensor_scale,
    *,
    a_spec: OperandSpec,
    b_spec: OperandSpec,
    k: int,
    cfg: MatmulConfig,
    compute_dtype,
    interpret: bool = False,
) -> jax.Array:
    """out[M, N] float32 = (a . b^T) * tensor_scale.

    a_arrays: (x[M, K],) for a dense operand, (codes[M, K or K/2] uint8, scales[M/br, K/bk] uint8)
    for a quantized one; b_arrays likewise with N rows; tensor_scale: float32 [1] (product of both
    operands' tensor scales). Validation is the caller's (api.py) job.
    """
    m = a_arrays[0].shape[0]
    n = b_arrays[0].shape[0]
    grid_m, grid_n = pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n)
    kernel = functools.partial(
        _matmul_kernel,
        a_spec=a_spec,
        b_spec=b_spec,
        m=m,
        n=n,
        k=k,
        grid_m=grid_m,
        grid_n=grid_n,
        cfg=cfg,
        compute_dtype=compute_dtype,
    )
    in_specs = (
        _operand_specs(a_spec, a_arrays, cfg.block_m, k, grid_m, grid_n, "a")
        + _operand_specs(b_spec, b_arrays, cfg.block_n, k, grid_m, grid_n, "b")
        + [pl.BlockSpec((1,), lambda pid, s: (0,))]
    )
    # Split-K partials land in their own slab and are summed after (decode-sized M: more programs
    # in flight to stream the weight at full bandwidth).
    out_spec = pl.BlockSpec(
        (None, cfg.block_m, cfg.block_n), lambda pid, s: (s, *_swizzle(pid, grid_m, grid_n))
    )
    out = pl.pallas_call(
        kernel,
        grid=(grid_m * grid_n, cfg.split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="qmatmul",
    )(*a_arrays, *b_arrays, tensor_scale.reshape(1).astype(jnp.float32))
    return out[0] if cfg.split_k == 1 else jnp.sum(out, axis=0)
