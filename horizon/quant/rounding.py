"""Rounding of float32 values onto a low-precision element grid (E2M1, E4M3, E5M2): round to
nearest even, or stochastic rounding with explicit keys, as in "Pretraining Large Language Models
with NVFP4" (NVIDIA, 2025), section 4.3.

Both modes work on the grid spacing (ulp) of the target format at |v|: a power of two, so |v| / ulp
is exact and rounding reduces to rounding one float32 to an integer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROUNDINGS = ("rne", "stochastic")

# GEMM ids of a linear layer, folded into the layer key (`gemm_key`).
FPROP, DGRAD, WGRAD = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ElementGrid:
    """A sign-magnitude float grid: `mbits` mantissa bits, smallest normal exponent `emin`, and
    largest finite magnitude `max`. Below 2**emin the spacing is 2**(emin - mbits) (subnormals)."""

    mbits: int
    emin: int
    max: float


GRIDS = {
    "e2m1": ElementGrid(mbits=1, emin=0, max=6.0),
    "e4m3": ElementGrid(mbits=3, emin=-6, max=448.0),
    "e5m2": ElementGrid(mbits=2, emin=-14, max=57344.0),
}


def pow2(e: jax.Array) -> jax.Array:
    """2.0**e as float32 for int32 e in [-126, 127], built from the exponent bits (exact)."""
    return jax.lax.bitcast_convert_type((e + 127).astype(jnp.int32) << 23, jnp.float32)


def floor_log2(a: jax.Array) -> jax.Array:
    """floor(log2(a)) for float32 a > 0, from the exponent bits; -127 for zero and subnormals."""
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF) - 127


def round_to_grid(
    v: jax.Array, elem: str, rounding: str = "rne", u: jax.Array | None = None
) -> jax.Array:
    """Round float32 `v` onto the `elem` grid, saturating at its max; returns float32 grid values.

    rounding "rne": nearest, ties to even mantissa. "stochastic": up with probability equal to the
    distance from the lower grid point in ulps, given `u` ~ Uniform[0, 1) of v's shape, so that
    E[round(v)] = v for |v| <= max. The sign is kept (negative values round to -0.0 at worst).
    """
    grid = GRIDS[elem]
    v = v.astype(jnp.float32)
    mag = jnp.minimum(jnp.abs(v), grid.max)
    # Exponent of |v| clamped to the normal range of the target: below it the spacing is fixed.
    e = jnp.maximum(floor_log2(mag), grid.emin)
    n = mag * pow2(grid.mbits - e)  # |v| in ulps, exact (multiplication by a power of two)
    if rounding == "rne":
        n = jnp.round(n)  # half to even: even multiples of the ulp have an even mantissa
    elif rounding == "stochastic":
        assert u is not None and u.shape == v.shape, "stochastic rounding needs u of v's shape"
        lo = jnp.floor(n)
        n = lo + (u < (n - lo)).astype(jnp.float32)
    else:
        raise AssertionError(rounding)
    # Rounding up at the top of a binade lands exactly on the next power of two; at most `max`.
    out = jnp.minimum(n * pow2(e - grid.mbits), grid.max)
    return jnp.where(jnp.signbit(v), -out, out)


def layer_key(step_key: jax.Array, layer: int) -> jax.Array:
    """The key of one layer at one step: fold_in(step_key, layer). Pass it to `quantized_dot`."""
    return jax.random.fold_in(step_key, layer)


def gemm_key(layer_key_: jax.Array, gemm_id: int) -> jax.Array:
    """The key of one GEMM (FPROP, DGRAD, WGRAD) of a layer: fold_in(layer_key, gemm_id), so the
    full derivation is fold_in(fold_in(step_key, layer), gemm_id) and a step is reproducible."""
    return jax.random.fold_in(layer_key_, gemm_id)


def uniform(key: jax.Array, shape: tuple[int, ...], axis: int = -1) -> jax.Array:
    """Uniform[0, 1) float32 draws of `shape` for stochastic rounding, from a counter-based hash.

    u = (fmix32(fmix32(i ^ s0) + s1) >> 8) * 2**-24, with (s0, s1) = jax.random.bits(key, (2,),
    uint32), fmix32 the MurmurHash3 finalizer, and i the element's row-major index in the layout
    where `axis` is last (moveaxis(x, axis, -1)): the quantization axis. So quantizing x along
    axis 0 draws exactly what quantizing x.T along its last axis draws, whatever the memory layout.
    Cheap on CPU (threefry per element costs more than the quantization itself) and easy to
    reproduce inside a fused quantize kernel. 24 bits: P(u < f) is within 2**-24 of f.
    """
    s = jax.random.bits(key, (2,), jnp.uint32)
    axis %= len(shape)
    order = [d for d in range(len(shape)) if d != axis] + [axis]  # dims of the logical layout
    i = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(order):
        i = i + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
        stride *= shape[d]
    h = _fmix32(_fmix32(i ^ s[0]) + s[1])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)
