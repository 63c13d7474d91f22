"""Weight-only NVFP4 product for decoding (Pallas Triton): out[M, N] = x[M, K] . w[N, K]^T with x
in bf16 (M small) and w packed E2M1 with E4M3 block scales (NVIDIA NVFP4, 2025).

The general kernel (pallas_triton.py) decodes one code per byte lane, and on an H200 that costs
~17 instructions per weight element: the GEMV is bound by instruction issue, not by the ~3.5x
fewer bytes it reads. Here the codes are read as 32-bit words (eight codes) and decoded with
integer SIMD-within-a-register into f16 pairs, two codes per instruction:

  f16 bits of E2M1 code (s e1 e0 m) = s << 15 | (e1 e0 m) << 9, whose value is exactly
  e2m1 * 2^-14 (e1 e0 = 0 lands in the f16 subnormals: 0.5 * 2^-14 included),

then one f16x2 multiply applies the E4M3 block scale (exact: e2m1 * scale * 2^-14 has at most six
significant bits and lies in [2^-24, 0.17], inside f16), and f16 tensor-core dots accumulate in
fp32. x moves to f16 exactly: each row is multiplied by a power of two that puts its largest
magnitude in [2^14, 2^15), so every bf16 element within 2^-28 of the row's largest is an f16
normal and keeps all of its 8 bits (smaller ones round at an absolute 2^-38 of the row max). The
2^14 and the row powers are undone on the fp32 output.

Word g of a row holds elements 8g..8g+7 (nibble i = element 8g + i, low nibble first as
`pack_e2m1` stores them); the f16 pair decoded from nibbles (j, j + 4) stays adjacent along K in
the one [block_n, block_k] tile each step feeds its dot, so x is reordered outside the kernel into
the same K order (`_interleave`, `to_f16_reordered`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.qmatmul import codecs
from kernels.qmatmul.config import MatmulConfig

WORD = 8  # E2M1 codes per 32-bit word
# The f16 decode of a code is its value times 2^-DECODE_EXP (exponent bias 15 against E2M1's 1).
DECODE_EXP = 14


def word_view(packed):
    """uint8 [N, K/2] packed codes -> uint32 [N, K/8] words (byte 0 lowest, as little-endian)."""
    n, half = packed.shape
    return lax.bitcast_convert_type(packed.reshape(n, half // 4, 4), jnp.uint32)


def f16_pair_bits(words, j: int):
    """f16x2 bit patterns (as uint32) of nibbles j (low half) and j + 4 (high half) of each word:
    the E2M1 sign to bit 15 and exponent + mantissa to bits 11..9 of each half."""
    t = words >> jnp.uint32(4 * j)
    return ((t & jnp.uint32(0x00070007)) << 9) | ((t & jnp.uint32(0x00080008)) << 12)


def scale_pair_bits(scale_codes):
    """E4M3 scale codes (uint8) -> f16x2 bit patterns (uint32) holding the scale twice."""
    s16 = lax.bitcast_convert_type(scale_codes, jnp.float8_e4m3fn).astype(jnp.float16)  # exact
    s32 = lax.bitcast_convert_type(s16, jnp.uint16).astype(jnp.uint32)
    return s32 | (s32 << 16)


def scaled_halves(pair_bits, scale_bits, *, interpret: bool):
    """(low, high) f16 halves of the f16x2 product pair_bits * scale_bits (exact, see the module
    docstring): one mul.rn.f16x2 per word on the GPU (no flush of subnormals), an f16 multiply
    in interpret mode. The halves are split with a same-width bitcast of each 16-bit half."""
    if interpret:
        prod = pair_bits
        halves = [
            _half(h) * _half(s) for h, s in ((prod, scale_bits), (prod >> 16, scale_bits >> 16))
        ]
        return tuple(halves)
    # Triton's inline asm takes signless integers: pass int32 views of the bits.
    [prod] = plgpu.elementwise_inline_asm(
        "mul.rn.f16x2 $0, $1, $2;",
        args=[lax.bitcast_convert_type(v, jnp.int32) for v in (pair_bits, scale_bits)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(pair_bits.shape, jnp.int32)],
    )
    prod = lax.bitcast_convert_type(prod, jnp.uint32)
    return _half(prod), _half(prod >> 16)


def _half(bits_u32):
    """The f16 in the low 16 bits of a uint32."""
    return lax.bitcast_convert_type((bits_u32 & jnp.uint32(0xFFFF)).astype(jnp.uint16), jnp.float16)


def _interleave(lo, hi):
    """[bn, g] tiles lo[j], hi[j] (j = 0..3: nibbles j and j + 4) -> [bn, g, 2, 2, 2] indexed
    (word, j % 2, j // 2, low/high) by stacking on new last axes (tt.join), so that each f16
    pair of one product stays adjacent along K: the order `to_f16_reordered` gives x."""

    def tree(t):
        return jnp.stack([jnp.stack([t[0], t[1]], -1), jnp.stack([t[2], t[3]], -1)], -1)

    return jnp.stack([tree(lo), tree(hi)], -1)


def row_exponents(x):
    """Per-row power of two e with max |x_row| * 2^-e in [2^14, 2^15) (0 for all-zero rows;
    clamped to [-127, 113] so that 2^-e and the output's 2^(e + 14) stay normal fp32)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    e = jnp.clip(codecs.floor_log2(amax) - 14, -127, 113)
    return jnp.where(amax > 0, e, 0)


def to_f16_reordered(x, e, block_k: int, k_padded: int):
    """x[M, K] * 2^-e (per row) in f16, zero-padded to k_padded columns (a multiple of block_k)
    and each block_k chunk reordered as `_interleave` lays out the decoded weights: column
    ((w * 2 + jlow) * 2 + jhigh) * 2 + t holds element 8 w + jlow + 2 jhigh + 4 t."""
    m, k = x.shape
    kp = k_padded
    x16 = (x.astype(jnp.float32) * codecs.pow2(-e)[:, None]).astype(jnp.float16)
    x16 = jnp.pad(x16, ((0, 0), (0, kp - k)))
    # Element 8 w + i of a chunk with i = j + 4 t, j = jlow + 2 jhigh sits at column
    # ((w * 2 + jlow) * 2 + jhigh) * 2 + t (see _interleave).
    x16 = x16.reshape(m, kp // block_k, block_k // WORD, 2, 2, 2)  # (.., w, t, jhigh, jlow)
    return jnp.transpose(x16, (0, 1, 2, 5, 4, 3)).reshape(m, kp)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, n, k, block, cfg: MatmulConfig, interpret):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    br, _ = block
    j_tile = pl.program_id(0)
    steps = pl.cdiv(pl.cdiv(k, bk), cfg.split_k)
    k_first = pl.program_id(1) * (steps * bk)
    rows = j_tile * bn + jnp.arange(bn)
    row_ok = rows < n
    g = bk // WORD  # words per row per step

    def body(step, acc):
        k0 = pl.multiple_of(k_first + step * bk, bk)
        w_cols_ok = k0 // WORD + jnp.arange(g) < k // WORD
        words = plgpu.load(
            w_ref.at[:, pl.ds(k0 // WORD, g)], mask=row_ok[:, None] & w_cols_ok[None, :], other=0
        )
        s_rows = bn // br
        s_ok = (j_tile * s_rows + jnp.arange(s_rows) < -(-n // br))[:, None] & (
            k0 // 16 + jnp.arange(bk // 16) < k // 16
        )[None, :]
        sc = plgpu.load(s_ref.at[:, pl.ds(k0 // 16, bk // 16)], mask=s_ok, other=0)
        # One scale per two words (16 codes) and per br rows: broadcast to [bn, g].
        s2 = scale_pair_bits(sc)
        s2 = jnp.broadcast_to(s2[:, None, :, None], (s_rows, br, bk // 16, 2)).reshape(bn, g)
        lo, hi = zip(
            *(
                scaled_halves(f16_pair_bits(words, j), s2, interpret=interpret)
                for j in range(WORD // 2)
            )
        )
        w_tile = _interleave(lo, hi).reshape(bn, bk)  # one [bn, bk] tile in x's reordered K
        x = plgpu.load(x_ref.at[:, pl.ds(k0, bk)])  # padded to bm rows
        return acc + lax.dot_general(
            x, w_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref, acc, mask=jnp.broadcast_to(row_ok[None, :], acc.shape))


@functools.partial(jax.jit, static_argnames=("block", "cfg", "interpret"))
def gemv_f16(x, packed, scales, tensor_scale, *, block, cfg: MatmulConfig, interpret=False):
    """out[M, N] float32 = x[M, K] . w[N, K]^T * tensor_scale for bf16/f16 x (M <= block_m) and
    NVFP4 w as packed codes uint8 [N, K/2] with E4M3 scales [N / block[0], K / 16]. Validation
    is the caller's (api.py) job."""
    m, k = x.shape
    n = packed.shape[0]
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    assert m <= bm and bk % 128 == 0, (m, cfg)  # api.py picks the config
    e = row_exponents(x)
    # Every step of every split-K program reads x unmasked: pad to all of them.
    x16 = to_f16_reordered(x, e, bk, pl.cdiv(pl.cdiv(k, bk), cfg.split_k) * cfg.split_k * bk)
    words = word_view(packed)
    kernel = functools.partial(_kernel, n=n, k=k, block=block, cfg=cfg, interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), cfg.split_k),
        in_specs=[
            pl.BlockSpec((bm, x16.shape[1]), lambda j, s: (0, 0)),
            pl.BlockSpec((bn, words.shape[1]), lambda j, s: (j, 0)),
            pl.BlockSpec((bn // block[0], scales.shape[1]), lambda j, s: (j, 0)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, bm, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="gemv_nvfp4_f16",
    )(jnp.pad(x16, ((0, bm - m), (0, 0))), words, scales)
    out = jnp.sum(out, axis=0)[:m]
    # Undo the decode's 2^-14 and each row's 2^-e, then the tensor scale.
    return out * (codecs.pow2(e + DECODE_EXP)[:, None] * tensor_scale.astype(jnp.float32))
