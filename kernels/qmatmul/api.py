"""kernels.qmatmul.qmatmul: the public block-scaled matmul. Validates operands at trace time and
dispatches: cuDNN block-scaled GEMM (Blackwell), the Pallas kernel (other GPUs, or interpret mode),
the XLA dequantize-then-dot reference (CPU). `last_implementation()` says which one ran.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.dispatch import gpu_capability
from kernels.errors import KernelInputError
from kernels.qmatmul import gemv_f16, pallas_triton
from kernels.qmatmul.config import MatmulConfig, pick_matmul_config
from kernels.qmatmul.packed import PackedQTensor
from kernels.qmatmul.qtensor import ELEMENT_FORMAT, FORMATS, SCALE_FORMAT, QTensor, decode
from kernels.qmatmul.reference import qmatmul_reference

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")
# cuDNN's block-scaled GEMM (jax.nn.scaled_matmul on compute capability >= 10): E2M1 with E4M3
# scales per 16, or E4M3/E5M2 with E8M0 scales per 32, both operands quantized alike.
_CUDNN_FORMATS = {"nvfp4": 16, "mxfp8": 32, "mxfp8_e5m2": 32}

# implementation=None on a GPU without block-scaled MMA: the Pallas kernel up to this many rows
# of a (decoding, weight-only), the XLA dequantize-then-dot above.
PALLAS_MAX_M = 64

_last = {"implementation": None}


def last_implementation() -> str | None:
    """ "xla", "pallas" or "cudnn": the path the most recent qmatmul call (or trace) dispatched to."""
    return _last["implementation"]


def qmatmul(
    a,
    b,
    *,
    implementation: str | None = None,
    interpret: bool = False,
    config: MatmulConfig | None = None,
) -> jax.Array:
    """out[M, N] float32 = a[M, K] . b[N, K]^T (both contract their last axis).

    a, b: QTensor, PackedQTensor (E2M1 two per byte) or float arrays; either may be high
      precision (weight-only quantization). Tensor scales are applied to the output.
    implementation: None (best for the backend: "cudnn" on Blackwell when both operands take it;
      on other GPUs "pallas" for M <= PALLAS_MAX_M (decoding) and "xla" above, where one dequantize
      pass plus the bf16 GEMM is faster; "xla" on CPU), "xla" (dequantize-then-dot reference),
      "pallas" (needs a GPU, or interpret=True), "cudnn" (needs compute capability >= 10).
    interpret: run the Pallas kernel in interpret mode (CPU tests); implies the Pallas path when
      implementation is None.
    config: Pallas tile sizes (default: picked by shape).
    """
    _validate(a, b)
    impl = _choose(a, b, implementation, interpret)
    _last["implementation"] = impl
    if impl == "xla":
        return qmatmul_reference(_unpacked(a), _unpacked(b))
    if impl == "cudnn":
        return _cudnn(a, b)
    return _pallas(a, b, interpret=interpret, config=config)


# ----------------------------------------------------------------------------- validation


def _validate(a, b) -> None:
    for name, x in (("a", a), ("b", b)):
        if isinstance(x, (QTensor, PackedQTensor)):
            if x.fmt not in FORMATS:
                raise KernelInputError(
                    f"qmatmul: {name}.fmt={x.fmt!r} is not a format; use one of {', '.join(FORMATS)}"
                )
            scales_shape = tuple(x.scales.shape)
            if len(x.block_shape) != len(x.shape) or any(
                n % bs for n, bs in zip(x.shape, x.block_shape)
            ):
                raise KernelInputError(
                    f"qmatmul: {name} block_shape {x.block_shape} does not tile its shape {x.shape}; "
                    "quantize with a block that divides every dim"
                )
            want = tuple(n // bs for n, bs in zip(x.shape, x.block_shape))
            if scales_shape != want:
                raise KernelInputError(
                    f"qmatmul: {name}.scales has shape {scales_shape} but values {x.shape} with block "
                    f"{x.block_shape} need {want}; pass the scales quantize returned with these values"
                )
            codes = x.codes if isinstance(x, QTensor) else x.packed
            if x.scales.dtype != jnp.uint8 or codes.dtype != jnp.uint8:
                raise KernelInputError(
                    f"qmatmul: {name} codes and scales must be uint8 bit patterns"
                )
        elif not jnp.issubdtype(x.dtype, jnp.floating):
            raise KernelInputError(
                f"qmatmul: {name} must be a QTensor or a float array, got dtype {x.dtype}"
            )
        if x.ndim != 2:
            raise KernelInputError(
                f"qmatmul: {name} must be 2-D [rows, K], got shape {tuple(x.shape)}"
            )
    if a.shape[1] != b.shape[1]:
        raise KernelInputError(
            f"qmatmul: contraction dims differ: a {tuple(a.shape)} vs b {tuple(b.shape)} (both contract the last axis)"
        )


def _cudnn_ok(a, b) -> bool:
    return (
        isinstance(a, (QTensor, PackedQTensor))
        and isinstance(b, (QTensor, PackedQTensor))
        and a.fmt == b.fmt
        and a.fmt in _CUDNN_FORMATS
        and all(x.block_shape[1] == _CUDNN_FORMATS[x.fmt] for x in (a, b))
    )


def _pallas_block(x) -> tuple[int, int]:
    return (1, 1) if x.fmt == "fp8" else tuple(x.block_shape)


def _pallas_ok(x) -> str | None:
    """Why the Pallas kernel cannot take operand x (None when it can)."""
    if not isinstance(x, (QTensor, PackedQTensor)):
        return None
    br, bk = _pallas_block(x)
    if br not in (1, 16, 32) or bk not in (1, 16, 32):
        return (
            f"block_shape {x.block_shape} (the kernel takes blocks of 1, 16 or 32 along each axis)"
        )
    return None


def _choose(a, b, implementation, interpret) -> str:
    if implementation not in (None, *IMPLEMENTATIONS):
        raise KernelInputError(
            f"qmatmul: implementation={implementation!r} is not available; use None, {', '.join(map(repr, IMPLEMENTATIONS))}"
        )
    cc = gpu_capability()
    if implementation is None:
        if interpret:
            implementation = "pallas"
        elif cc is None:
            return "xla"
        elif cc >= 10.0 and _cudnn_ok(a, b):
            return "cudnn"
        elif a.shape[0] <= PALLAS_MAX_M:
            implementation = "pallas"
        else:
            # Without block-scaled tensor cores, dequantizing once and running the vendor bf16
            # GEMM beats re-decoding every tile per output tile once M is large (H200, 8192^3:
            # 0.87x of bf16 against 0.21x for the Pallas kernel; tools/device/qmatmul.py).
            return "xla"
    if implementation == "pallas":
        if cc is None and not interpret:
            raise KernelInputError(
                f"qmatmul: implementation='pallas' needs a GPU (Triton) but the backend is {jax.default_backend()!r}; "
                "pass interpret=True to run the kernel on CPU, or implementation='xla'"
            )
        for name, x in (("a", a), ("b", b)):
            why = _pallas_ok(x)
            if why:
                raise KernelInputError(
                    f"qmatmul: implementation='pallas' cannot take {name} with {why}; use implementation='xla'"
                )
    if implementation == "cudnn":
        if not _cudnn_ok(a, b):
            fa = getattr(a, "fmt", "float")
            fb = getattr(b, "fmt", "float")
            raise KernelInputError(
                f"qmatmul: implementation='cudnn' takes both operands quantized alike in nvfp4 (1x16 blocks) or "
                f"mxfp8 (1x32); got a={fa}, b={fb}; use implementation='pallas' or 'xla'"
            )
        if cc is None or cc < 10.0:
            raise KernelInputError(
                f"qmatmul: implementation='cudnn' needs a GPU of compute capability >= 10 (Blackwell); this backend "
                f"is {jax.default_backend()!r}{'' if cc is None else f' with compute capability {cc}'}; use 'pallas'"
            )
    return implementation


def _unpacked(x):
    return x.unpack() if isinstance(x, PackedQTensor) else x


# ----------------------------------------------------------------------------- Pallas


def _operand(x) -> tuple[pallas_triton.OperandSpec, tuple, jax.Array, jnp.dtype]:
    """(spec, arrays, tensor scale, the dtype it feeds the dot in) of one operand."""
    if not isinstance(x, (QTensor, PackedQTensor)):
        return pallas_triton.OperandSpec("dense"), (x,), jnp.float32(1.0), x.dtype
    packed = isinstance(x, PackedQTensor)
    codes = x.packed if packed else x.codes
    ts = x.tensor_scale.astype(jnp.float32)
    if x.fmt == "fp8":
        # One scale for the whole tensor: fold it into the tensor scale.
        ts = ts * decode(x.scales.reshape(()), "e4m3")
        spec = pallas_triton.OperandSpec("quant", ELEMENT_FORMAT[x.fmt], "none", (1, 1), packed)
        return spec, (codes,), ts, jnp.bfloat16
    spec = pallas_triton.OperandSpec(
        "quant", ELEMENT_FORMAT[x.fmt], SCALE_FORMAT[x.fmt], tuple(x.block_shape), packed
    )
    return spec, (codes, x.scales), ts, jnp.bfloat16


def _pallas(a, b, *, interpret: bool, config: MatmulConfig | None) -> jax.Array:
    a_spec, a_arrays, ts_a, da = _operand(a)
    b_spec, b_arrays, ts_b, db = _operand(b)
    # The reference's rule: bf16 dot when both sides are bf16-exact (quantized or bf16), else fp32.
    compute = jnp.bfloat16 if (da == jnp.bfloat16 and db == jnp.bfloat16) else jnp.float32
    m, k = a.shape
    n = b.shape[0]
    on_gpu = not interpret
    if config is None:
        row_block = max(a_spec.block[0], b_spec.block[0])
        config = pick_matmul_config(m, n, k, row_block=row_block, on_gpu=on_gpu)
        cc = gpu_capability()
        if on_gpu and config.decode == "fp8" and (cc is None or cc < 8.9):
            config = dataclasses.replace(config, decode="f32")  # no fp8 conversions before sm_89
    if config.decode == "f16x2":
        return _gemv_f16(a, b, config, interpret=interpret)
    for spec, rows_tile, name in (
        (a_spec, config.block_m, "block_m"),
        (b_spec, config.block_n, "block_n"),
    ):
        if rows_tile % spec.block[0]:
            raise KernelInputError(
                f"qmatmul: config.{name}={rows_tile} must be a multiple of the block rows {spec.block[0]}"
            )
    return pallas_triton.qmatmul_pallas(
        a_arrays,
        b_arrays,
        ts_a * ts_b,
        a_spec=a_spec,
        b_spec=b_spec,
        k=k,
        cfg=config,
        compute_dtype=compute,
        interpret=interpret,
    )


def _gemv_f16(a, b, config: MatmulConfig, *, interpret: bool) -> jax.Array:
    """The decode="f16x2" kernel, after checking it can take (a, b)."""
    why = None
    if isinstance(a, (QTensor, PackedQTensor)) or a.dtype not in (jnp.bfloat16, jnp.float16):
        why = f"a must be a bf16/f16 array, got {getattr(a, 'fmt', a.dtype)}"
    elif not isinstance(b, PackedQTensor) or b.fmt != "nvfp4":
        why = "b must be a PackedQTensor in nvfp4 (pack() it)"
    elif a.shape[0] > config.block_m:
        why = f"a has {a.shape[0]} rows, more than block_m={config.block_m}"
    elif config.block_k % 128 or config.block_n % b.block_shape[0]:
        why = f"block_k={config.block_k} must be a multiple of 128 and block_n={config.block_n} of {b.block_shape[0]}"
    if why:
        raise KernelInputError(
            f"qmatmul: config.decode='f16x2' (weight-only NVFP4 GEMV) cannot run: {why}; "
            "use decode='fp8'"
        )
    return gemv_f16.gemv_f16(
        a, b.packed, b.scales, b.tensor_scale, block=tuple(b.block_shape), cfg=config,
        interpret=interpret,
    )


# ----------------------------------------------------------------------------- cuDNN


def cudnn_operands(x) -> tuple[jax.Array, jax.Array]:
    """(elements [R, K] as float4_e2m1fn / float8_*, per-row block scales [R, K / bk] as
    float8_e4m3fn / float8_e8m0fnu) of a QTensor, the inputs jax.nn.scaled_matmul takes.
    2-D (16x16) blocks repeat their scale over the 16 rows they cover (exact)."""
    x = _unpacked(x)
    elem = ELEMENT_FORMAT[x.fmt]
    el_dtype = {"e2m1": jnp.float4_e2m1fn, "e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}[elem]
    if elem == "e2m1":
        elements = decode(x.codes, "e2m1").astype(
            el_dtype
        )  # every E2M1 value is exact in float4_e2m1fn
    else:
        elements = jax.lax.bitcast_convert_type(x.codes, el_dtype)
    sc_dtype = jnp.float8_e4m3fn if SCALE_FORMAT[x.fmt] == "e4m3" else jnp.float8_e8m0fnu
    scales = jax.lax.bitcast_convert_type(x.scales, sc_dtype)
    if x.block_shape[0] > 1:
        scales = jnp.repeat(scales, x.block_shape[0], axis=0)
    return elements, scales


def _cudnn(a, b) -> jax.Array:
    a_el, a_sc = cudnn_operands(a)
    b_el, b_sc = cudnn_operands(b)
    out = jax.nn.scaled_matmul(
        a_el[None], b_el[None], a_sc[None], b_sc[None], preferred_element_type=jnp.float32
    )[0]
    return out * (a.tensor_scale.astype(jnp.float32) * b.tensor_scale.astype(jnp.float32))
