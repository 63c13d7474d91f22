"""Fused block-scaled quantize (Pallas Triton): optional random Hadamard transform, block amax,
block scales, round-to-nearest-even or stochastic rounding and E2M1 packing in one pass over x.
NVFP4 ("Pretraining Large Language Models with NVFP4", NVIDIA, 2025), MXFP4/MXFP8 (OCP MX v1.0).

Bit-exact with horizon.quant.formats.quantize. The NVFP4/FP8 tensor amax is a small XLA reduction
that runs first; the kernel divides it into the tensor scale itself (XLA's fp32 division is not
correctly rounded on GPUs, and on CPU XLA may turn a division by a constant into a multiply) and
returns it with the codes. Stochastic rounding draws formats.py's Uniform[0, 1) values in the
kernel from the key's two seed words and each element's index (a counter-based hash).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.dispatch import has_fp8_conversions
from kernels.errors import KernelInputError
from kernels.qmatmul import codecs
from kernels.qmatmul.config import QuantizeConfig
from kernels.qmatmul.packed import PackedQTensor
from kernels.qmatmul.qtensor import BLOCK_SIZE, E2M1_MAX, E4M3_MAX, ELEMENT_FORMAT, FORMATS, QTensor

RHT_TILE = 16
ROUNDINGS = ("rne", "stochastic")


# ----------------------------------------------------------------------------- Hadamard


def rht_signs(seed: int) -> np.ndarray:
    """The 16 random signs of the RHT for `seed` (horizon.quant.hadamard's derivation)."""
    return np.random.default_rng(int(seed)).choice(np.array([-1.0, 1.0], np.float32), RHT_TILE)


def _sign_mask(seed: int) -> int:
    """Bit i set where sign i is negative: a scalar the kernel can carry (no array constants)."""
    return int(sum(1 << i for i, s in enumerate(rht_signs(seed)) if s < 0))


def rht_last_axis(x, sign_mask: int):
    """x[..., C] (C % 16 == 0, float32) times R = diag(signs) H16 / 4 on every 16-wide tile.

    Evaluated as signs, then the fast Walsh-Hadamard butterfly (stages of width 1, 2, 4, 8 of
    (a + b, a - b)), then * 0.25: a fixed summation order, so the kernel and XLA agree bit for bit.
    """
    *lead, c = x.shape
    col = jnp.arange(c, dtype=jnp.int32) % RHT_TILE
    neg = ((jnp.int32(sign_mask) >> col) & 1) == 1
    y = codecs.flip_sign(x, neg)
    h = 1
    while h < RHT_TILE:
        # [.., C / 2h, 2, h] -> pair axis last so it splits into (a, b) without strided slices.
        t = jnp.swapaxes(y.reshape(*lead, c // (2 * h), 2, h), -1, -2)
        a, b = t[..., 0], t[..., 1]
        y = jnp.swapaxes(jnp.stack([a + b, a - b], axis=-1), -1, -2).reshape(*lead, c)
        h *= 2
    return y * 0.25


def _unstack_last(t):
    """(t[..., 0], t[..., 1]) of a size-2 last axis as one primitive Triton lowers (tt.split)."""
    return tuple(jax.lax.unstack(t, axis=t.ndim - 1))


def _rht_tile(x, sign_mask: int):
    """rht_last_axis on a 2-D kernel tile with unstack (Triton lowers only last-axis size-2 splits)."""
    rows, c = x.shape
    col = jnp.arange(c, dtype=jnp.int32) % RHT_TILE
    neg = ((jnp.int32(sign_mask) >> col) & 1) == 1
    y = codecs.flip_sign(x, jnp.broadcast_to(neg[None, :], x.shape))
    h = 1
    while h < RHT_TILE:
        t = jnp.transpose(y.reshape(rows, c // (2 * h), 2, h), (0, 1, 3, 2))
        a, b = _unstack_last(t)
        y = jnp.transpose(jnp.stack([a + b, a - b], axis=-1), (0, 1, 3, 2)).reshape(rows, c)
        h *= 2
    return y * 0.25


# ----------------------------------------------------------------------------- the kernel


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (horizon.quant.rounding._fmix32), uint32 in and out."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_tile(seeds, index_u32):
    """horizon.quant.rounding.uniform at the given element indices: (fmix32(fmix32(i ^ s0) + s1)
    >> 8) * 2**-24, so stochastic rounding needs no random array in memory."""
    h = _fmix32(_fmix32(index_u32 ^ seeds[0]) + seeds[1])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _quantize_kernel(
    *refs, fmt, block, rounding, sign_mask, r, c, cfg: QuantizeConfig, exact_asm, packed
):
    if rounding == "stochastic":
        x_ref, seed_ref, amax_ref, codes_ref, scales_ref, ts_out_ref = refs
    else:
        x_ref, amax_ref, codes_ref, scales_ref, ts_out_ref = refs
    br_t, bc_t = cfg.block_rows, cfg.block_cols
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * br_t + jnp.arange(br_t)
    cols = j * bc_t + jnp.arange(bc_t)
    rows_ok, cols_ok = rows < r, cols < c
    mask = rows_ok[:, None] & cols_ok[None, :]
    x = plgpu.load(x_ref, mask=mask, other=0).astype(jnp.float32)
    if sign_mask is not None:
        x = _rht_tile(x, sign_mask)
    u = None
    if rounding == "stochastic":
        # formats.py indexes the draws row-major in the layout with the quantized axis last: this
        # [R, C] view. uint32 arithmetic wraps exactly as the spec's uint32 iota does.
        index = rows.astype(jnp.uint32)[:, None] * jnp.uint32(c) + cols.astype(jnp.uint32)[None, :]
        u = uniform_tile((seed_ref[0], seed_ref[1]), index)
    elem = ELEMENT_FORMAT[fmt]
    # A [1] array, not a scalar: Triton's inline asm (the exact division) takes tensors.
    ts1 = scale_from_amax(plgpu.load(amax_ref), fmt, exact_asm=exact_asm)
    # Every program writes the same value: the QTensor's tensor scale, computed as the kernel's.
    plgpu.store(ts_out_ref, ts1)
    ts = ts1[0]

    if fmt == "fp8":
        if cfg.fast_div:
            scaled = _fast_div(x, ts1[:, None], ts, exact_asm=exact_asm)
        else:
            scaled = codecs.div(x, ts, exact_asm=exact_asm)
        scale_codes = None
    else:
        # Work on the blocked view so per-block values broadcast without expanding the tile.
        x = codecs.blocked(x, block)
        u = None if u is None else codecs.blocked(u, block)
        amax_b = codecs.block_max(jnp.abs(x), block)
        if fmt == "nvfp4":
            scale_b = jnp.minimum(
                codecs.div(
                    codecs.div(amax_b, jnp.float32(E2M1_MAX), exact_asm=exact_asm),
                    ts,
                    exact_asm=exact_asm,
                ),
                E4M3_MAX,
            )
            scale_codes = codecs.fp8_code_rne(scale_b, "e4m3", hw=cfg.hw_fp8)
            denom_b = codecs.decode_fp8(scale_codes, "e4m3", hw=cfg.hw_fp8) * ts
            if cfg.fast_div:
                scaled = _fast_div(x, codecs.per_block(denom_b, block), ts, exact_asm=exact_asm)
            else:
                denom = jnp.broadcast_to(codecs.per_block(denom_b, block), x.shape)
                scaled = codecs.div(x, denom, exact_asm=exact_asm)
            scaled = jnp.where(codecs.per_block(denom_b, block) > 0, scaled, 0.0)
        else:
            shared = jnp.clip(codecs.floor_log2(amax_b) - codecs.EMAX_ELEM[elem], -127, 127)
            scale_codes = (shared + 127).astype(jnp.uint8)
            scaled = x * codecs.per_block(codecs.pow2(-shared), block)

    if elem == "e2m1" and rounding == "rne":
        codes = codecs.e2m1_code_rne(scaled)
    elif elem == "e2m1":
        codes = codecs.e2m1_code_sr(scaled, u)
    elif rounding == "rne":
        codes = codecs.fp8_code_rne(scaled, elem, hw=cfg.hw_fp8)
    else:
        codes = codecs.encode(codecs.round_to_grid(scaled, elem, rounding, u), elem)
    codes = codes.reshape(br_t, bc_t)
    if packed:
        lo, hi = _unstack_last(codes.reshape(br_t, bc_t // 2, 2))
        half_ok = j * (bc_t // 2) + jnp.arange(bc_t // 2) < c // 2
        plgpu.store(codes_ref, lo | (hi << 4), mask=rows_ok[:, None] & half_ok[None, :])
    else:
        plgpu.store(codes_ref, codes, mask=mask)
    if scale_codes is not None:
        sr, sc = block
        s_rows_ok = i * (br_t // sr) + jnp.arange(br_t // sr) < r // sr
        s_cols_ok = j * (bc_t // sc) + jnp.arange(bc_t // sc) < c // sc
        plgpu.store(scales_ref, scale_codes, mask=s_rows_ok[:, None] & s_cols_ok[None, :])


def _fast_div(x, denom, ts, *, exact_asm):
    """RN(x / denom) for positive denominators shared by many elements (per block, or the tensor
    scale), broadcastable to x: one reciprocal per denominator (QuantizeConfig.fast_div).

    Both sides are first multiplied by 2^k (k = -floor(log2 ts), per tensor), which is exact and
    keeps the quotient, and puts every denominator (a block scale in [2^-9, 448] times ts 2^k in
    [1, 2), a subnormal spec product scaled up, or ts 2^k itself) in [2^-23, 896]: the range where
    div.rn's fast path needs no slow path. An element whose scaled value underflows has a quotient
    below 2^-100, which every element grid rounds to zero either way."""
    p = codecs.pow2(jnp.clip(-codecs.floor_log2(ts), -126, 126))
    d = denom * p
    r = codecs.reciprocal(jnp.where(d > 0, d, 1.0), exact_asm=exact_asm)
    return codecs.div_by_reciprocal(x * p, d, r, exact_asm=exact_asm)


@functools.partial(
    jax.jit,
    static_argnames=(
        "fmt",
        "block",
        "rounding",
        "sign_mask",
        "cfg",
        "exact_asm",
        "packed",
        "interpret",
    ),
)
def _quantize_2d(
    x,
    seeds,
    amax,
    *,
    fmt,
    block,
    rounding,
    sign_mask,
    cfg: QuantizeConfig,
    exact_asm,
    packed,
    interpret,
):
    """x[R, C] quantized along C with (br, bk) blocks, amax = max |x| (after the RHT) ->
    (codes [R, C] or packed [R, C/2], scales, tensor scale [1])."""
    r, c = x.shape
    br_t, bc_t = cfg.block_rows, cfg.block_cols
    grid = (pl.cdiv(r, br_t), pl.cdiv(c, bc_t))
    sr, sc = block
    tile = pl.BlockSpec((br_t, bc_t), lambda i, j: (i, j))
    seeds_spec = [pl.BlockSpec((2,), lambda i, j: (0,))] if seeds is not None else []
    in_specs = [tile] + seeds_spec + [pl.BlockSpec((1,), lambda i, j: (0,))]
    codes_cols = c // 2 if packed else c
    codes_block = (br_t, bc_t // 2) if packed else (br_t, bc_t)
    scale_shape = (r // sr, c // sc) if fmt != "fp8" else (1, 1)
    scale_block = (br_t // sr, bc_t // sc) if fmt != "fp8" else (1, 1)
    kernel = functools.partial(
        _quantize_kernel,
        fmt=fmt,
        block=block,
        rounding=rounding,
        sign_mask=sign_mask,
        r=r,
        c=c,
        cfg=cfg,
        exact_asm=exact_asm,
        packed=packed,
    )
    args = [x] + ([seeds] if seeds is not None else []) + [amax.reshape(1)]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec(codes_block, lambda i, j: (i, j)),
            pl.BlockSpec(
                scale_block, (lambda i, j: (i, j)) if fmt != "fp8" else (lambda i, j: (0, 0))
            ),
            pl.BlockSpec((1,), lambda i, j: (0,)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((r, codes_cols), jnp.uint8),
            jax.ShapeDtypeStruct(scale_shape, jnp.uint8),
            jax.ShapeDtypeStruct((1,), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"quantize_{fmt}",
    )(*args)


# ----------------------------------------------------------------------------- public entry


def _block_shape(shape, fmt, block, axis) -> tuple[int, ...]:
    """formats.py's block shape in x's own orientation (axis gets block[1], the other of the
    last two dims block[0]), with KernelInputError for what it cannot take."""
    ndim = len(shape)
    if fmt == "fp8":
        if block is not None:
            raise KernelInputError(
                f"quantize: fp8 has one per-tensor scale; got block={block}, pass block=None"
            )
        return tuple(shape)
    block = (1, BLOCK_SIZE[fmt]) if block is None else tuple(block)
    if len(block) != 2 or block[1] not in (16, 32) or block[0] not in (1, 16, 32):
        raise KernelInputError(
            f"quantize: block={block} is not supported by the kernel; use (1, 16), (16, 16) or (1, 32)"
        )
    out = [1] * ndim
    out[axis] = block[1]
    if block[0] > 1:
        if ndim < 2 or axis < ndim - 2:
            raise KernelInputError(
                f"quantize: 2-D block {block} needs axis in the last two dims of x {tuple(shape)}"
            )
        out[2 * ndim - 3 - axis] = block[0]
    for d, (n, b) in enumerate(zip(shape, out)):
        if n % b:
            raise KernelInputError(
                f"quantize: x.shape[{d}]={n} is not a multiple of the block size {b} (block={block}, axis={axis}); "
                f"pad it to a multiple of {b}"
            )
    return tuple(out)


def tensor_amax(x_f32):
    """max |x| (float32 scalar), the small pass that comes before the kernel."""
    return (jnp.max(jnp.abs(x_f32)) if x_f32.size else jnp.float32(0)).astype(jnp.float32)


def scale_from_amax(amax, fmt: str, *, exact_asm: bool):
    """The per-tensor scale formats.py derives from amax (a [1] array), with its correctly
    rounded division."""
    if fmt == "nvfp4":
        ts = codecs.div(amax, jnp.float32(E2M1_MAX * E4M3_MAX), exact_asm=exact_asm)
        return jnp.where(ts > 0, ts, 1.0).astype(jnp.float32)
    if fmt == "fp8":
        ts = codecs.div(amax, jnp.float32(E4M3_MAX), exact_asm=exact_asm)
        return jnp.where(amax > 0, ts, 1.0).astype(jnp.float32)
    return jnp.ones_like(amax, jnp.float32)


def quantize(
    x: jax.Array,
    fmt: str,
    *,
    block: tuple[int, int] | None = None,
    axis: int = -1,
    rounding: str = "rne",
    key: jax.Array | None = None,
    rht_seed: int | None = None,
    packed: bool = False,
    config: QuantizeConfig | None = None,
    interpret: bool = False,
) -> QTensor | PackedQTensor:
    """The fused quantize kernel: horizon.quant.quantize(x, fmt, block=, axis=, rounding=, key=)
    bit for bit, optionally of rht(x, axis=axis, seed=rht_seed) (Hadamard along the same axis).

    x: float array, any rank >= 1. Returns a QTensor (codes of x.shape) or, with packed=True (E2M1
    formats, axis = last dim), a PackedQTensor with two codes per byte along the last axis.
    """
    if fmt not in FORMATS:
        raise KernelInputError(
            f"quantize: fmt={fmt!r} is not a format; choose one of {', '.join(FORMATS)}"
        )
    if rounding not in ROUNDINGS:
        raise KernelInputError(
            f"quantize: rounding={rounding!r}; choose one of {', '.join(ROUNDINGS)}"
        )
    if rounding == "stochastic" and key is None:
        raise KernelInputError(
            "quantize: rounding='stochastic' needs key= (the same key formats.quantize gets)"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
        raise KernelInputError(
            f"quantize: x must be a float array of rank >= 1, got {x.dtype}{list(x.shape)}"
        )
    ndim = x.ndim
    if not -ndim <= axis < ndim:
        raise KernelInputError(
            f"quantize: axis={axis} is out of range for x of shape {tuple(x.shape)}"
        )
    axis %= ndim
    block_shape = _block_shape(x.shape, fmt, block, axis)
    if rht_seed is not None and x.shape[axis] % RHT_TILE:
        raise KernelInputError(
            f"quantize: rht needs x.shape[{axis}]={x.shape[axis]} to be a multiple of {RHT_TILE}"
        )
    if packed and (ELEMENT_FORMAT[fmt] != "e2m1" or axis != ndim - 1):
        raise KernelInputError(
            f"quantize: packed=True needs an E2M1 format quantized along the last axis; got {fmt}, axis={axis}"
        )
    sign_mask = None if rht_seed is None else _sign_mask(rht_seed)

    # Work on [R, C] with the quantized axis last; the (other-of-last-two) block dim is rows.
    perm = tuple(d for d in range(ndim) if d != axis) + (axis,)
    rc = (int(np.prod([x.shape[d] for d in perm[:-1]])), x.shape[axis])
    kb = (block_shape[perm[-2]] if ndim >= 2 else 1, block_shape[axis]) if fmt != "fp8" else (1, 1)
    if config is None:
        on_gpu = not interpret and jax.default_backend() == "gpu"
        config = pick_quantize_config(
            rc, kb, on_gpu=on_gpu, hw_fp8=on_gpu and has_fp8_conversions()
        )
    if fmt != "fp8" and (config.block_rows % kb[0] or config.block_cols % kb[1]):
        raise KernelInputError(
            f"quantize: config tiles {config} must be multiples of the block {kb}"
        )
    return _quantize_impl(
        x,
        key if rounding == "stochastic" else None,
        fmt=fmt,
        block_shape=block_shape,
        perm=perm,
        kb=kb,
        rounding=rounding,
        sign_mask=sign_mask,
        packed=packed,
        config=config,
        interpret=interpret,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "fmt",
        "block_shape",
        "perm",
        "kb",
        "rounding",
        "sign_mask",
        "packed",
        "config",
        "interpret",
    ),
)
def _quantize_impl(
    x, key, *, fmt, block_shape, perm, kb, rounding, sign_mask, packed, config, interpret
):
    ndim, axis = x.ndim, perm[-1]
    xt = jnp.transpose(x, perm) if axis != ndim - 1 else x
    lead = xt.shape[:-1]
    x2 = xt.reshape(-1, xt.shape[-1])
    seeds = jax.random.bits(key, (2,), jnp.uint32) if rounding == "stochastic" else None

    # The small first pass: tensor amax (of the transformed x) and finiteness.
    x_for_amax = x2.astype(jnp.float32)
    if sign_mask is not None:
        x_for_amax = rht_last_axis(x_for_amax, sign_mask)
    amax = tensor_amax(x_for_amax)
    finite = jnp.all(jnp.isfinite(x_for_amax))

    codes2, scales2, ts = _quantize_2d(
        x2,
        seeds,
        amax,
        fmt=fmt,
        block=kb,
        rounding=rounding,
        sign_mask=sign_mask,
        cfg=config,
        exact_asm=not interpret,
        packed=packed,
        interpret=interpret,
    )
    ts = jnp.where(finite, ts[0], jnp.nan).astype(jnp.float32)
    if fmt == "fp8":
        scales = jnp.full((1,) * ndim, 0x38, jnp.uint8)
    else:
        scales = scales2.reshape(
            *[n // block_shape[d] for d, n in zip(perm[:-1], lead)], scales2.shape[-1]
        )
        if axis != ndim - 1:
            scales = jnp.transpose(scales, np.argsort(perm))
    if packed:
        return PackedQTensor(codes2.reshape(*lead, -1), scales, ts, fmt, block_shape)
    codes = codes2.reshape(xt.shape)
    if axis != ndim - 1:
        codes = jnp.transpose(codes, np.argsort(perm))
    return QTensor(codes, scales, ts, fmt, block_shape)


def pick_quantize_config(shape_rc, block, *, on_gpu: bool, hw_fp8: bool = False) -> QuantizeConfig:
    """Tiles by shape: rows a multiple of the 2-D block height, up to 256 columns. On an H200,
    16 x 256 tiles with 4 warps beat 32 x 256, 16 x 512 and 32 x 512 (tools/device/qmatmul.py).
    hw_fp8: round E4M3/E5M2 with the hardware conversion (sm_89+)."""
    r, c = shape_rc
    cols = 32
    while cols < c and cols < 256:
        cols *= 2
    rows = max(16, block[0])
    if on_gpu:
        return QuantizeConfig(
            block_rows=rows, block_cols=cols, num_warps=4, num_stages=1, hw_fp8=hw_fp8
        )
    while rows * cols < 4096 and rows < r:
        rows *= 2
    return QuantizeConfig(block_rows=rows, block_cols=cols)
