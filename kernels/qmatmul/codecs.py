"""Exact encode/decode/rounding of E2M1, E4M3, E5M2 and E8M0 written with integer ops, floor and
same-width bitcasts only, so the same code runs inside Pallas Triton kernels (no round, no fp8
types needed) and in interpret mode. Formats: OCP Microscaling v1.0 (2023), NVIDIA NVFP4 (2025).

Encoding mirrors horizon/quant/{formats,rounding}.py operation by operation (they are the spec);
tests check the two bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plgpu

from kernels.qmatmul.qtensor import E2M1_MAGNITUDES

# (mantissa bits, smallest normal exponent, largest finite magnitude) of each element grid.
GRIDS = {"e2m1": (1, 0, 6.0), "e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}
# OCP MX v1.0 table 1: emax of each element format.
EMAX_ELEM = {"e2m1": 2, "e4m3": 8, "e5m2": 15}


# ----------------------------------------------------------------------------- bits helpers


def f32_from_bits(bits_i32):
    return lax.bitcast_convert_type(bits_i32, jnp.float32)


def bits_of(x_f32):
    return lax.bitcast_convert_type(x_f32, jnp.int32)


def pow2(e):
    """2.0**e as float32 for int32 e in [-127, 127] from the exponent bits (e = -127 gives 0.0,
    as in horizon.quant.rounding._pow2)."""
    return f32_from_bits((e + 127) << 23)


def floor_log2(a):
    """floor(log2(a)) of float32 a > 0 from the exponent bits; -127 for zero and subnormals."""
    return ((bits_of(a) >> 23) & 0xFF) - 127


def signbit(x_f32):
    """True where the float32 sign bit is set (-0.0 included)."""
    return (bits_of(x_f32) >> 31) != 0


def _with_sign(mag_f32, sign_bit_i32):
    return f32_from_bits(bits_of(mag_f32) | sign_bit_i32)


_SIGN = -(2**31)  # the fp32 sign bit as an int32


def copysign_nonneg(mag_f32, v_f32):
    """XLA's where(signbit(v), -mag, mag) for mag >= 0, by moving the sign bit: Triton lowers
    negation as 0 - x, which turns -(+0.0) into +0.0 and would drop the sign of zero codes."""
    return f32_from_bits(bits_of(mag_f32) | (bits_of(v_f32) & jnp.int32(_SIGN)))


def flip_sign(x_f32, neg):
    """-x where neg (bool), by flipping the sign bit (exact for zeros too, unlike 0 - x)."""
    return f32_from_bits(bits_of(x_f32) ^ (neg.astype(jnp.int32) << 31))


# ----------------------------------------------------------------------------- decoders


def decode_e2m1(c):
    """E2M1 code (low nibble of uint8) -> float32. Codes v = c & 7 >= 2 carry (exponent, mantissa)
    straight into the fp32 exponent and top mantissa bit (bias 1 -> 127); v in {0, 1} is 0 or 0.5."""
    ci = c.astype(jnp.int32)
    v = ci & 7
    mag = jnp.where(v < 2, v.astype(jnp.float32) * 0.5, f32_from_bits((v + 252) << 22))
    return _with_sign(mag, (ci & 8) << 28)


def decode_e4m3(c):
    """E4M3 (fn: no infinities, S.1111.111 is NaN) byte -> float32; bias 7, subnormals m * 2^-9."""
    ci = c.astype(jnp.int32)
    mag7 = ci & 0x7F
    sub = (ci & 7).astype(jnp.float32) * np.float32(2.0**-9)
    mag = jnp.where((mag7 >> 3) == 0, sub, f32_from_bits((mag7 << 20) + (120 << 23)))
    mag = jnp.where(mag7 == 0x7F, jnp.float32(jnp.nan), mag)
    return _with_sign(mag, (ci & 0x80) << 24)


def decode_e5m2(c):
    """E5M2 byte -> float32; bias 15, subnormals m * 2^-16, exponent 31 is inf (m = 0) or NaN."""
    ci = c.astype(jnp.int32)
    mag7 = ci & 0x7F
    sub = (ci & 3).astype(jnp.float32) * np.float32(2.0**-16)
    e = mag7 >> 2
    mag = jnp.where(e == 0, sub, f32_from_bits((mag7 << 21) + (112 << 23)))
    special = jnp.where((ci & 3) == 0, jnp.float32(jnp.inf), jnp.float32(jnp.nan))
    mag = jnp.where(e == 31, special, mag)
    return _with_sign(mag, (ci & 0x80) << 24)


def decode_e8m0(c):
    """E8M0 byte -> 2^(c - 127) as float32; 0 is the subnormal 2^-127 (CPU backends may flush it to
    zero, as qtensor.decode does there), 255 is NaN."""
    ci = c.astype(jnp.int32)
    val = jnp.where(ci == 0, jnp.float32(2.0**-127), f32_from_bits(ci << 23))
    return jnp.where(ci == 255, jnp.float32(jnp.nan), val)


DECODE = {"e2m1": decode_e2m1, "e4m3": decode_e4m3, "e5m2": decode_e5m2, "e8m0": decode_e8m0}


# ----------------------------------------------------------------------------- rounding, encoders


def round_to_grid(v, elem: str, rounding: str, u=None):
    """horizon.quant.rounding.round_to_grid with jnp.round replaced by floor + an exact tie test
    (|v| in ulps is a small non-negative float, so lo, frac and the parity are exact)."""
    mbits, emin, vmax = GRIDS[elem]
    mag = jnp.minimum(jnp.abs(v), vmax)
    e = jnp.maximum(floor_log2(mag), emin)
    n = mag * pow2(mbits - e)
    lo = jnp.floor(n)
    if rounding == "rne":
        frac = n - lo
        odd = (lo.astype(jnp.int32) & 1) == 1
        n = lo + ((frac > 0.5) | ((frac == 0.5) & odd)).astype(jnp.float32)
    elif rounding == "stochastic":
        n = lo + (u < (n - lo)).astype(jnp.float32)
    else:
        raise AssertionError(rounding)
    out = jnp.minimum(n * pow2(e - mbits), vmax)
    return copysign_nonneg(out, v)


# fp32 bits of 2**22: adding it to a magnitude below 2 leaves |v| in units of 0.5 in the low
# mantissa bits, rounded to nearest even by the adder itself (ulp(2**22) = 0.5).
_HALF_UNITS = 2.0**22
_HALF_UNITS_BITS = 0x4A800000
# E2M1 code of 1.0 minus the fp32 bits of 1.0 >> 22: a normal |v| in [1, 6] has code
# (bits >> 22) - _NORMAL_BIAS (exponent and top mantissa bit are the E2M1 exponent and mantissa).
_NORMAL_BIAS = (0x3F800000 >> 22) - 2


def _e2m1_sign(code_i32, v):
    """Attach the sign of v (bit 3, from the fp32 sign bit: -0.0 and NaN signs included)."""
    return (code_i32 | ((bits_of(v) >> 28) & 8)).astype(jnp.uint8)


def e2m1_code_rne(v):
    """encode(round_to_grid(v, "e2m1", "rne")) with integer and one fp32 add per element (no
    compare ladder): for |v| >= 1 the E2M1 code is fp32 exponent + top mantissa bit rounded to
    nearest even in the integers, bits + (2**21 - 1) + bit22 >> 22 (the carry of a round-up
    moves to the next binade, 1.75 -> 2, and 6 saturates as min(|v|, 6)); below 1 it is |v| in
    units of 0.5, rounded by adding 2**22 (an exact RNE by the adder). NaN gives a signed zero code,
    as the spec's comparisons do; +-inf saturates to +-6."""
    mag = jnp.abs(v)
    b = bits_of(jnp.minimum(mag, 6.0))
    normal = ((b + ((1 << 21) - 1) + ((b >> 22) & 1)) >> 22) - _NORMAL_BIAS
    small = bits_of(mag + jnp.float32(_HALF_UNITS)) - _HALF_UNITS_BITS
    code = jnp.where(mag < 1.0, small, jnp.where(mag >= 1.0, normal, 0))
    return _e2m1_sign(code, v)


def e2m1_code_sr(v, u):
    """encode(round_to_grid(v, "e2m1", "stochastic", u)) without the compare ladder: E2M1 points
    have consecutive codes, so the code is the code at or below |v| plus one when u < the distance
    to the next point in ulps. For |v| >= 1 both come from the fp32 bits: code = bits >> 22 -
    bias, distance = the 22 mantissa bits below it, and u < frac is compared exactly in 24-bit
    integers (u is a multiple of 2**-24); below 1 the spec's n = 2|v| is split by floor. At the
    saturated top, 6, the distance is 0. NaN gives a signed zero code."""
    mag = jnp.abs(v)
    b = bits_of(jnp.minimum(mag, 6.0))
    u24 = (u * jnp.float32(2.0**24)).astype(jnp.int32)
    normal = (b >> 22) - _NORMAL_BIAS + (u24 < ((b & 0x3FFFFF) << 2)).astype(jnp.int32)
    n = mag * 2.0
    lo = jnp.floor(n)
    small = lo.astype(jnp.int32) + (u < n - lo).astype(jnp.int32)
    code = jnp.where(mag < 1.0, small, jnp.where(mag >= 1.0, normal, 0))
    return _e2m1_sign(code, v)


_FP8_DTYPE = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fp8_code_rne(v, elem: str, *, hw: bool):
    """encode(round_to_grid(v, elem, "rne"), elem) for elem "e4m3" / "e5m2": with hw=True the
    f32 -> fp8 conversion (RNE, saturating, as horizon.quant.formats encodes), else the integer
    emulation that runs on any GPU."""
    if not hw:
        return encode(round_to_grid(v, elem, "rne"), elem)
    vmax = GRIDS[elem][2]
    # Clamp first as the spec does (XLA's conversion of an out-of-range value is NaN, not max).
    v = jnp.clip(v, -vmax, vmax)
    return lax.bitcast_convert_type(v.astype(_FP8_DTYPE[elem]), jnp.uint8)


def decode_fp8(c, elem: str, *, hw: bool):
    """float32 of E4M3/E5M2 codes: the hardware conversion (sm_89+) or the integer decoder."""
    if not hw:
        return DECODE[elem](c)
    return lax.bitcast_convert_type(c, _FP8_DTYPE[elem]).astype(jnp.float32)


def encode(values, elem: str):
    """uint8 codes of float32 values already on the `elem` grid (sign from the sign bit)."""
    neg = signbit(values)
    mag = jnp.abs(values)
    if elem == "e2m1":
        code = sum((mag >= g).astype(jnp.int32) for g in E2M1_MAGNITUDES[1:])
        return (code | (neg.astype(jnp.int32) << 3)).astype(jnp.uint8)
    mbits, emin, _ = GRIDS[elem]
    e = floor_log2(mag)
    sub = (mag * pow2(jnp.int32(mbits - emin))).astype(jnp.int32)
    normal = (
        ((e + 1 - emin) << mbits)
        + (mag * pow2(mbits - jnp.maximum(e, emin))).astype(jnp.int32)
        - (1 << mbits)
    )
    code = jnp.where(e < emin, sub, normal)
    return (code | (neg.astype(jnp.int32) << 7)).astype(jnp.uint8)


def exact_div(x, y):
    """x / y correctly rounded under XLA on CPU (horizon.quant.formats' divisions use it too):
    XLA rewrites a division by a broadcast divisor as a multiply by its reciprocal (an ulp off now
    and then, enough to move a value sitting on an E2M1 midpoint), so the broadcast divisor goes
    behind an optimization barrier, which keeps the divide a divide."""
    y = lax.optimization_barrier(jnp.broadcast_to(y, jnp.broadcast_shapes(x.shape, y.shape)))
    return x / y


def div(x, y, *, exact_asm: bool):
    """x / y rounded to nearest even. Triton lowers fp32 `/` to the approximate div.full.f32, so
    on GPU the IEEE division is spelled out in PTX (bit-exactness with the XLA spec needs it)."""
    if not exact_asm:
        return exact_div(x, y)
    x, y = jnp.broadcast_arrays(x, y)
    [out] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[x, y],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


# The fast path of PTX div.rn.f32 as ptxas emits it on sm_90: MUFU.RCP, one Newton step, then
# q = x r, an FMA residual and an FMA correction, guarded by FCHK (which sends operands of extreme
# exponent to a slow path). Split so the reciprocal is taken once per quantization block.
_RECIPROCAL_ASM = (
    "{ .reg .f32 r0, e, nd; rcp.approx.ftz.f32 r0, $1; neg.f32 nd, $1; "
    "fma.rn.f32 e, nd, r0, 0f3F800000; fma.rn.f32 $0, r0, e, r0; }"
)
_DIV_BY_RECIPROCAL_ASM = (
    "{ .reg .f32 q, e, nd; neg.f32 nd, $2; mul.rn.f32 q, $1, $3; "
    "fma.rn.f32 e, nd, q, $1; fma.rn.f32 $0, $3, e, q; }"
)


def reciprocal(d, *, exact_asm: bool):
    """div.rn's refined reciprocal of d (normal, positive): rcp.approx plus one Newton step.
    Only `div_by_reciprocal` uses it; in interpret mode that divides exactly, so this is 1 / d."""
    if not exact_asm:
        return 1.0 / d
    [out] = plgpu.elementwise_inline_asm(
        _RECIPROCAL_ASM,
        args=[d],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(d.shape, jnp.float32)],
    )
    return out


def div_by_reciprocal(x, d, r, *, exact_asm: bool):
    """x / d rounded to nearest even, given r = reciprocal(d) (x, d, r broadcast alike): div.rn's
    fast path without its range check, so the caller keeps d normal and moderate and only x / d
    that land far below 0.25 may leave the checked range (there any error is rounded away by the
    E2M1 grid). The sign comes from x (d > 0), which keeps -0.0 where the FMA sequence would not.
    Interpret mode divides exactly."""
    if not exact_asm:
        return exact_div(x, d)
    x, d, r = jnp.broadcast_arrays(x, d, r)
    [q] = plgpu.elementwise_inline_asm(
        _DIV_BY_RECIPROCAL_ASM,
        args=[x, d, r],
        constraints="=f,f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return f32_from_bits((bits_of(q) & jnp.int32(0x7FFFFFFF)) | (bits_of(x) & jnp.int32(_SIGN)))


# ----------------------------------------------------------------------------- layout helpers


# A [rows, cols] tile is viewed blocked as [rows / br, br, cols / bk, bk] (unit dims dropped), so
# per-block values broadcast against it with inserted unit axes: no materialized expansion and no
# layout shuffle of the large tile.


def blocked(x, block: tuple[int, int]):
    """[rows, cols] -> blocked view ([rows, cols/bk, bk] for 1-D blocks, 4-D for 2-D blocks)."""
    br, bk = block
    rows, cols = x.shape
    if br == 1:
        return x.reshape(rows, cols // bk, bk)
    return x.reshape(rows // br, br, cols // bk, bk)


def unblocked(xb, rows: int, cols: int):
    return xb.reshape(rows, cols)


def per_block(s, block: tuple[int, int]):
    """Per-block values [rows / br, cols / bk] shaped to broadcast against `blocked(x)`."""
    return s[:, :, None] if block[0] == 1 else s[:, None, :, None]


def block_max(xb, block: tuple[int, int]):
    """max over each block of a blocked tile -> [rows / br, cols / bk]."""
    if block[0] == 1:
        return jnp.max(xb, axis=2)
    return jnp.max(jnp.max(xb, axis=3), axis=1)
