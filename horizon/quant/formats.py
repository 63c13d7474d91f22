"""Block-scaled quantization into a `QTensor`: NVFP4 ("Pretraining Large Language Models with
NVFP4", NVIDIA, 2025), MXFP8 / MXFP4 (OCP Microscaling Formats v1.0, 2023) and FP8 with a
per-tensor current scale. Decoding is `kernels.qmatmul.qtensor` (one decoder for the project).

The fused quantize kernel in kernels/qmatmul mirrors `quantize` bit for bit: keep it simple.
The CPU result is the specification: XLA's fp32 division on GPUs is not correctly rounded (a
probe on an H200 found 2340 of 8192 quotients off by an ulp), so `quantize` run through XLA on a
GPU can differ from it in a few codes, while the Pallas kernel (PTX div.rn) matches it exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError, NonFiniteError, ShapeError
from horizon.quant import rounding as _rounding
from kernels.qmatmul import codecs as _codecs
from kernels.qmatmul import qtensor as _qt
from kernels.qmatmul.qtensor import E2M1_MAX, E4M3_MAX, QTensor

FORMATS = _qt.FORMATS  # nvfp4, mxfp4, mxfp8, mxfp8_e5m2, fp8
DEFAULT_BLOCK = {
    "nvfp4": (1, 16),
    "mxfp4": (1, 32),
    "mxfp8": (1, 32),
    "mxfp8_e5m2": (1, 32),
    "fp8": None,
}
# OCP MX v1.0 table 1: emax of each element format (largest power of two below its max).
_EMAX_ELEM = {"e2m1": 2, "e4m3": 8, "e5m2": 15}
_ELEM_DTYPE = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}




def quantize(
    x: jax.Array,
    fmt: str,
    *,
    block: tuple[int, int] | None = None,
    axis: int = -1,
    rounding: str = "rne",
    key: jax.Array | None = None,
) -> QTensor:
    """Quantize `x` (any float dtype, any rank) to `fmt` with block scales along `axis`.

    fmt: "nvfp4" | "mxfp4" | "mxfp8" | "mxfp8_e5m2" | "fp8".
    block: (rows, cols) in the orientation where `axis` is the last dim: (1, 16) = 16 elements
      along `axis`; (16, 16) = 16 along `axis` times 16 along the other of the last two dims.
      None = the format's default ((1, 16) nvfp4, (1, 32) mx*); fp8 takes no block (one scale).
      Every blocked dim must be a multiple of its block size (nothing is padded).
    rounding: "rne" or "stochastic" (then `key` is required; the draws index x in the layout
      where `axis` is last, so quantize(x, axis=0).T == quantize(x.T, axis=-1) with SR too).
    Returns a QTensor with codes of x.shape, scales of x.shape // block_shape, fp32 tensor scale.

    NVFP4: s = amax / (6 * 448); block scale = e4m3_rne(min(amax_b / 6 / s, 448));
      element = e2m1(clip(x / (block_scale * s), -6, 6)). amax = 0 gives s = 1 and zeros; a block
      whose scale rounds to 0 quantizes to zeros.
    MX: shared exponent = clamp(floor(log2(amax_b)) - emax_elem, -127, 127) (OCP MX v1.0 sec. 6.3);
      element = saturate(x / 2**shared_exp); tensor scale 1.
    FP8: s = amax / 448 (current scaling); element = e4m3(clip(x / s, -448, 448)); block scale 1.
    Non-finite x: raises NonFiniteError when x is concrete; under jit the tensor scale is NaN, so
      everything computed from the QTensor is NaN (count them with `nonfinite_count`).
    """
    if fmt not in FORMATS:
        raise ConfigError(
            f"quantize: fmt={fmt!r} is not a format; choose one of {', '.join(FORMATS)}"
        )
    if rounding not in _rounding.ROUNDINGS:
        raise ConfigError(
            f"quantize: rounding={rounding!r}; choose one of {', '.join(_rounding.ROUNDINGS)}"
        )
    if rounding == "stochastic" and key is None:
        raise ConfigError(
            "quantize: rounding='stochastic' needs key=; derive it with horizon.quant.gemm_key"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"quantize: x must be a float array, got dtype {x.dtype}")
    check_finite(x, "quantize: x")
    block_shape = _block_shape(x.shape, fmt, block, axis)
    axis %= x.ndim
    key = key if rounding == "stochastic" else None
    return _quantize(x, key, fmt=fmt, block_shape=block_shape, axis=axis, rounding=rounding)


@functools.partial(jax.jit, static_argnames=("fmt", "block_shape", "axis", "rounding"))
def _quantize(
    x: jax.Array, key, *, fmt: str, block_shape: tuple[int, ...], axis: int, rounding: str
) -> QTensor:
    """The quantization itself (see `quantize`); jitted so that eager calls are one op."""
    x = x.astype(jnp.float32)
    u = _rounding.uniform(key, x.shape, axis) if rounding == "stochastic" else None
    elem = _qt.ELEMENT_FORMAT[fmt]

    amax = jnp.max(jnp.abs(x)) if x.size else jnp.float32(0)
    # Not isfinite(amax): XLA's max may drop NaNs.
    finite = jnp.all(jnp.isfinite(x))
    if fmt == "nvfp4":
        tensor_scale = _div(amax, E2M1_MAX * E4M3_MAX)
        # amax = 0 (or a scale that underflows): a unit scale, and every block quantizes to zero.
        tensor_scale = jnp.where(tensor_scale > 0, tensor_scale, 1.0)
        amax_b = _block_amax(x, block_shape)
        scale_b = jnp.minimum(_div(_div(amax_b, E2M1_MAX), tensor_scale), E4M3_MAX)
        scale_codes = _to_float8_bits(scale_b, "e4m3")
        denom = _qt.decode(scale_codes, "e4m3") * tensor_scale
        scaled = _blockwise(x, block_shape, lambda xb, d: jnp.where(d > 0, _div(xb, d), 0.0), denom)
    elif fmt == "fp8":
        tensor_scale = jnp.where(amax > 0, _div(amax, E4M3_MAX), 1.0)
        scaled = _div(x, tensor_scale)
        scale_codes = jnp.full((1,) * x.ndim, 0x38, jnp.uint8)  # e4m3 1.0
    else:
        tensor_scale = jnp.float32(1.0)
        amax_b = _block_amax(x, block_shape)
        shared_exp = jnp.clip(_rounding.floor_log2(amax_b) - _EMAX_ELEM[elem], -127, 127)
        scale_codes = (shared_exp + 127).astype(jnp.uint8)
        # Multiply by 2**-shared_exp (a normal fp32 for every finite amax_b), never divide by a
        # possibly subnormal 2**shared_exp that CPUs flush to zero.
        scaled = _blockwise(x, block_shape, lambda xb, p: xb * p, _rounding.pow2(-shared_exp))

    values = _rounding.round_to_grid(scaled, elem, rounding, u)
    codes = encode(values, elem)
    tensor_scale = jnp.where(finite, tensor_scale, jnp.nan).astype(jnp.float32)
    return QTensor(codes, scale_codes, tensor_scale, fmt, block_shape)


def dequantize(q: QTensor) -> jax.Array:
    """The float32 value a QTensor stands for: element * block scale * tensor scale.

    This is `kernels.qmatmul.qtensor.dequantize`. An E8M0 scale code 0 (2**-127, subnormal) may be
    flushed to zero by CPU backends; it only occurs for MX blocks with amax below ~2**-125.
    """
    return _dequantize(q)


_dequantize = jax.jit(functools.partial(_qt.dequantize, dtype=jnp.float32))


def encode(values: jax.Array, elem: str) -> jax.Array:
    """uint8 codes of float32 values already on the `elem` grid ("e2m1", "e4m3", "e5m2")."""
    if elem == "e2m1":
        mag = jnp.abs(values)
        # Magnitude code = number of grid points (after 0) at or below |v|: 0.5 1 1.5 2 3 4 6.
        code = sum((mag >= g).astype(jnp.uint8) for g in _qt.E2M1_MAGNITUDES[1:])
        return code | (jnp.signbit(values).astype(jnp.uint8) << 3)
    return _to_float8_bits(values, elem)


@jax.jit
def nonfinite_count(x: jax.Array) -> jax.Array:
    """Number of NaN/inf entries of x (int32), the count quantize reports by a NaN tensor scale."""
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _to_float8_bits(v: jax.Array, elem: str) -> jax.Array:
    """Round-to-nearest-even float32 -> e4m3fn / e5m2, as the uint8 bit pattern."""
    return jax.lax.bitcast_convert_type(v.astype(_ELEM_DTYPE[elem]), jnp.uint8)


def _div(a: jax.Array, b) -> jax.Array:
    """a / b correctly rounded (IEEE) on CPU: kernels.qmatmul.codecs.exact_div (XLA would
    otherwise turn a division by a broadcast b into a multiply by 1 / b)."""
    return _codecs.exact_div(a, jnp.asarray(b, jnp.float32))


def check_finite(x: jax.Array, what: str) -> None:
    """Raise NonFiniteError if concrete `x` holds NaN/inf; a no-op on traced values (under jit)."""
    if isinstance(x, jax.core.Tracer):
        return
    try:
        bad = int(nonfinite_count(x))
    except jax.errors.ConcretizationTypeError:  # a constant captured inside a traced function
        return
    if bad:
        raise NonFiniteError(
            f"{what} of shape {tuple(x.shape)} has {bad} non-finite values (NaN/inf); "
            "find where they come from (loss scale, learning rate) before quantizing"
        )


def _block_shape(shape, fmt, block, axis) -> tuple[int, ...]:
    ndim = len(shape)
    if ndim == 0:
        raise ShapeError("quantize: x must have at least one dimension, got a scalar")
    if fmt == "fp8":
        if block is not None:
            raise ConfigError(
                f"quantize: fp8 uses one per-tensor scale; got block={block}, pass block=None"
            )
        return tuple(shape)
    block = DEFAULT_BLOCK[fmt] if block is None else tuple(block)
    if len(block) != 2 or min(block) < 1:
        raise ConfigError(
            f"quantize: block={block} must be (rows, cols) of positive ints, e.g. (1, 16), (16, 16)"
        )
    if not -ndim <= axis < ndim:
        raise ShapeError(f"quantize: axis={axis} is out of range for x of shape {tuple(shape)}")
    axis %= ndim
    out = [1] * ndim
    out[axis] = block[1]
    if block[0] > 1:
        if ndim < 2 or axis < ndim - 2:
            raise ShapeError(
                f"quantize: 2-D block {block} needs axis to be one of the last two dims of x "
                f"{tuple(shape)}, got axis={axis}"
            )
        out[2 * ndim - 3 - axis] = block[0]  # the other of the last two dims
    for d, (n, b) in enumerate(zip(shape, out)):
        if n % b:
            raise ShapeError(
                f"quantize: x.shape[{d}]={n} (shape {tuple(shape)}) is not a multiple of the block "
                f"size {b} (block={block}, axis={axis}); pad that dim to a multiple of {b}"
            )
    return tuple(out)


def _blocked_shape(shape, block_shape) -> tuple[int, ...]:
    """shape split into (n_0, b_0, n_1, b_1, ...): block index and position within the block."""
    return tuple(v for n, b in zip(shape, block_shape) for v in (n // b, b))


def _block_amax(x: jax.Array, block_shape) -> jax.Array:
    """max |x| per block, shape x.shape // block_shape."""
    xb = jnp.abs(x).reshape(_blocked_shape(x.shape, block_shape))
    return jnp.max(xb, axis=tuple(range(1, xb.ndim, 2)))


def _blockwise(x: jax.Array, block_shape, fn, per_block: jax.Array) -> jax.Array:
    """fn(x, per-block value broadcast over its block), shape x.shape; no repeats materialized."""
    xb = x.reshape(_blocked_shape(x.shape, block_shape))
    pb = jnp.expand_dims(per_block, tuple(range(1, xb.ndim, 2)))
    return fn(xb, pb).reshape(x.shape)
