"""Tile sizes for the Pallas block-scaled matmul and fused quantize kernels, and the small
heuristic that picks them from the problem shape."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulConfig:
    """Tiles of out[M, N] = a[M, K] . b[N, K]^T: one program per (block_m, block_n) output tile,
    looping over K in steps of block_k. All three are powers of two; block_k is a multiple of 32
    so every quantization block (16 or 32 along K) lies inside one step."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    # Programs per output tile along K (partials summed after): parallelism for decode-sized M.
    split_k: int = 1
    # How codes become floats in registers (all exact): "f32" integer/bitcast decoders (any GPU),
    # "fp8" the hardware fp8 -> bf16 conversion (sm_89+), "bf16" E2M1 bits straight to bf16,
    # "f16x2" the weight-only NVFP4 GEMV of gemv_f16.py (eight codes per 32-bit word, two decoded
    # per instruction into f16; bf16 x of at most block_m rows against packed weights only).
    decode: str = "f32"
    # Packed E2M1 (two codes per byte): "join" interleaves the two nibbles back into one tile;
    # "split" keeps even and odd elements apart and takes two half-depth dots.
    unpack: str = "join"

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name}={v} must be a power of two >= 16"
        assert self.block_k % 32 == 0, self.block_k
        assert self.split_k >= 1, self.split_k
        assert self.decode in ("f32", "fp8", "bf16", "f16x2"), self.decode
        assert self.unpack in ("join", "split"), self.unpack


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Rows per program of the fused quantize kernel (the whole quantized axis is one program's
    row, processed block_cols elements at a time)."""

    block_rows: int = 16
    block_cols: int = 256
    num_warps: int = 4
    num_stages: int = 2
    # Round to E4M3/E5M2 (NVFP4 block scales, MXFP8/FP8 elements with RNE) with the f32 -> fp8
    # conversion (one cvt.rn.satfinite per pair on sm_89+) instead of the integer emulation. Both
    # are round-to-nearest-even of a value already clamped to the format's max, so the codes agree.
    hw_fp8: bool = False
    # NVFP4 / FP8 element division as div.rn's own fast path with the reciprocal taken once per block
    # (or tensor) and
    # operands rescaled by a power of two into the range where that path is exact (GPU only; an
    # exact division in interpret mode). Opt-in until the bit-exact device check has run on it.
    fast_div: bool = False

    def __post_init__(self):
        for name in ("block_rows", "block_cols"):
            v = getattr(self, name)
            assert v >= 16 and v & (v - 1) == 0, f"{name}={v} must be a power of two >= 16"
        assert self.block_cols % 32 == 0, self.block_cols


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def pick_matmul_config(
    m: int, n: int, k: int, *, row_block: int = 1, on_gpu: bool = False
) -> MatmulConfig:
    """Tiles by shape: decode-sized M (<= 16) gets thin, many-program tiles so the weight stream
    saturates bandwidth; large problems get 128x128 tiles so each decoded operand tile feeds
    enough tensor-core work. row_block (16 for 2-D 16x16 scale blocks) bounds the row tiles below.
    """
    if not on_gpu:
        # Interpret mode: small tiles keep the emulated grid cheap on small test shapes.
        bm = max(_pow2_at_least(m, 16, 64), row_block)
        bn = max(_pow2_at_least(n, 16, 64), row_block)
        return MatmulConfig(block_m=bm, block_n=bn, block_k=64 if k > 32 else 32)
    if m <= 64:
        # Decode-sized M streams the weight: on an H200 thin K steps and split-K (thousands of
        # programs) beat wider tiles (tools/device/qmatmul.py sweep).
        bm = max(16 if m <= 16 else 64, row_block)
        bn, bk = max(64, row_block), 128
        tiles = -(-m // bm) * -(-n // bn)
        split = max(1, min(-(-2048 // tiles), k // (4 * bk)))
        return MatmulConfig(
            block_m=bm,
            block_n=bn,
            block_k=bk,
            num_warps=4,
            num_stages=5,
            split_k=split,
            decode="fp8",
            # Even/odd nibbles kept apart: 216 vs 230 us for 16K x 16K at M = 1 (H200, 2026-11-30).
            unpack="split",
        )
    if m * n < 1024 * 1024:
        return MatmulConfig(
            block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, decode="fp8"
        )
    return MatmulConfig(
        block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3, decode="fp8"
    )
