"""The qmatmul specification: dequantize both operands, then one dot with fp32 accumulation.

An E2M1 (or E4M3) element times its E4M3/E8M0 block scale is exact in bf16 (at most 6 significant
bits), so the operands are dequantized to bf16 with block scales applied, multiplied in bf16 with
fp32 accumulation, and the product of the two FP32 tensor scales is applied to the output: the
numbers a block-scaled tensor core produces, up to summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.qmatmul.qtensor import QTensor, expand_scales


def _operand(x, compute_dtype):
    """(value without tensor scale in compute_dtype, tensor scale) of a QTensor or array."""
    if isinstance(x, QTensor):
        blocks = expand_scales(x.scale_values(), x.block_shape, x.shape)
        return (x.element_values() * blocks).astype(compute_dtype), x.tensor_scale.astype(jnp.float32)
    return x.astype(compute_dtype), jnp.float32(1.0)


def qmatmul_reference(a, b) -> jax.Array:
    """out[M, N] = sum_k a[M, K] * b[N, K], a and b QTensors or arrays ("NT" layout), float32.

    Both quantized (or bf16): bf16 operands with fp32 accumulation. Either operand float32: fp32.
    """
    dtypes = [jnp.bfloat16 if isinstance(x, QTensor) else x.dtype for x in (a, b)]
    compute = jnp.bfloat16 if all(d == jnp.bfloat16 for d in dtypes) else jnp.float32
    a_MK, sa = _operand(a, compute)
    b_NK, sb = _operand(b, compute)
    out_MN = jax.lax.dot_general(
        a_MK, b_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return out_MN * (sa * sb)
