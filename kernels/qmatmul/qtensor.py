"""QTensor: a block-scaled low-precision tensor as a pytree, and the exact decoders of its formats.

Formats (OCP Microscaling v1.0, 2023; NVIDIA NVFP4, 2025):
  nvfp4: E2M1 elements, one E4M3 scale per 16 elements, one FP32 tensor scale.
  mxfp4: E2M1 elements, one E8M0 (power of two) scale per 32 elements, tensor scale 1.
  mxfp8: E4M3 (or E5M2, fmt "mxfp8_e5m2") elements, one E8M0 scale per 32 elements, tensor scale 1.
  fp8:   E4M3 elements, a single FP32 per-tensor scale (block = whole tensor, scales all 1.0).

Storage, one byte per element (packing two E2M1 codes per byte is `pack_e2m1`):
  codes:  uint8, the logical shape. E2M1: sign in bit 3, exponent bits 2-1, mantissa bit 0.
          E4M3/E5M2: the 8-bit pattern.
  scales: uint8 bit patterns (E4M3 for nvfp4 and fp8, E8M0 for mx*), shape = shape // block_shape
          per dimension.
  tensor_scale: float32 scalar.
Value of element i = decode(codes[i]) * decode(scales[block(i)]) * tensor_scale.

This file holds decoding only; encoding (rounding, scale choice) lives in horizon/quant/formats.py,
and the fused quantize kernel in this folder must match it bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# |value| of the 8 E2M1 magnitude codes: exponent bias 1, subnormal at exponent 0.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E5M2_MAX = 57344.0

ELEMENT_FORMAT = {"nvfp4": "e2m1", "mxfp4": "e2m1", "mxfp8": "e4m3", "mxfp8_e5m2": "e5m2", "fp8": "e4m3"}
SCALE_FORMAT = {"nvfp4": "e4m3", "mxfp4": "e8m0", "mxfp8": "e8m0", "mxfp8_e5m2": "e8m0", "fp8": "e4m3"}
BLOCK_SIZE = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32, "mxfp8_e5m2": 32}
FORMATS = tuple(ELEMENT_FORMAT)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor; see the module docstring for the layout."""

    codes: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    block_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def element_format(self) -> str:
        return ELEMENT_FORMAT[self.fmt]

    @property
    def scale_format(self) -> str:
        return SCALE_FORMAT[self.fmt]

    def scale_values(self) -> jax.Array:
        """Block scales decoded to float32, shape = shape // block_shape."""
        return decode(self.scales, self.scale_format)

    def element_values(self) -> jax.Array:
        """Elements decoded to float32 without any scale, the logical shape."""
        return decode(self.codes, self.element_format)

    @property
    def T(self) -> "QTensor":
        """Transpose of a 2-D QTensor (exact: codes and scales move together)."""
        assert self.ndim == 2
        return QTensor(self.codes.T, self.scales.T, self.tensor_scale, self.fmt, self.block_shape[::-1])


def decode_e2m1(codes: jax.Array) -> jax.Array:
    """E2M1 codes (uint8, low nibble) to float32, by table."""
    table = jnp.asarray(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), jnp.float32)
    return table[(codes & 0xF).astype(jnp.int32)]


def decode_e8m0(codes: jax.Array) -> jax.Array:
    """E8M0 codes to float32: 2**(code - 127); 255 is NaN (OCP MX v1.0, section 5.4)."""
    c = codes.astype(jnp.int32)
    # 2**-127 is subnormal in fp32; ldexp keeps it exact.
    val = jnp.ldexp(jnp.ones(c.shape, jnp.float32), c - 127)
    return jnp.where(c == 255, jnp.nan, val)


def decode(codes: jax.Array, element_format: str) -> jax.Array:
    """Decode uint8 codes of `element_format` in {e2m1, e4m3, e5m2, e8m0} to float32 exactly."""
    if element_format == "e2m1":
        return decode_e2m1(codes)
    if element_format == "e8m0":
        return decode_e8m0(codes)
    dtype = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}[element_format]
    return jax.lax.bitcast_convert_type(codes.astype(jnp.uint8), dtype).astype(jnp.float32)


def expand_scales(scales_f32: jax.Array, block_shape: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Broadcast per-block values back to the element shape (repeat along each blocked dim)."""
    out = scales_f32
    for dim, b in enumerate(block_shape):
        if b > 1:
            out = jnp.repeat(out, b, axis=dim)
    return jnp.broadcast_to(out, shape)


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
    """The value a QTensor stands for: element * block scale * tensor scale, as `dtype`."""
    block = expand_scales(q.scale_values(), q.block_shape, q.shape)
    return (q.element_values() * block * q.tensor_scale.astype(jnp.float32)).astype(dtype)


def pack_e2m1(codes: jax.Array) -> jax.Array:
    """Two E2M1 codes per byte along the last axis: element 2i in the low nibble, 2i+1 high."""
    assert codes.shape[-1] % 2 == 0, codes.shape
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2).astype(jnp.uint8)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack_e2m1(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_e2m1`."""
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_code_table() -> np.ndarray:
    """All 16 E2M1 codes with their values, for exhaustive tests."""
    return np.array(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), np.float32)
