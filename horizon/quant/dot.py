"""`quantized_dot`: a linear layer's matmul with all three GEMMs (fprop, dgrad, wgrad) quantized
per a `LinearRecipe`, as in "Pretraining Large Language Models with NVFP4" (NVIDIA, 2025): a
custom VJP whose backward quantizes dY, W and X itself, not a straight-through full-precision
matmul. Every GEMM runs through `kernels.qmatmul.qmatmul` in the NT form.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from horizon.errors import ConfigError, ShapeError
from horizon.quant.formats import check_finite, quantize
from horizon.quant.hadamard import TILE, rht
from horizon.quant.recipe import LinearRecipe, OperandQuant
from horizon.quant.rounding import DGRAD, FPROP, WGRAD, gemm_key
from kernels.qmatmul import qmatmul


def quantized_dot(
    x: jax.Array, w_KN: jax.Array, recipe: LinearRecipe, key: jax.Array | None = None
) -> jax.Array:
    """y[..., N] = x[..., K] @ w_KN[K, N] with the GEMMs quantized as `recipe` says.

    x: [..., K] (leading dims are flattened to M tokens inside); w_KN: the kernel in flax layout
    [K, N] (the paper's W is w_KN^T, [N, K]). Returns y in x's dtype; gradients come back in the
    dtypes of x and w_KN.
    key: the layer's key at this step, fold_in(step_key, layer) (`horizon.quant.layer_key`);
      needed when the recipe rounds stochastically. GEMM g in (FPROP=0, DGRAD=1, WGRAD=2) draws from
      fold_in(key, g), and its lhs / rhs operand from fold_in(that, 0) / fold_in(that, 1).
    Raises ShapeError when a contraction dim (K for fprop, N for dgrad, M for wgrad) or a 2-D
    weight block dim is not a multiple of its block size.
    """
    if w_KN.ndim != 2 or x.ndim < 1 or x.shape[-1] != w_KN.shape[0]:
        raise ShapeError(
            f"quantized_dot: x {tuple(x.shape)} and w_KN {tuple(w_KN.shape)} do not match; "
            "need x [..., K] and w_KN [K, N]"
        )
    if recipe.stochastic and key is None:
        raise ConfigError(
            "quantized_dot: the recipe rounds stochastically; pass key=layer_key(step_key, layer)"
        )
    K, N = w_KN.shape
    M = math.prod(x.shape[:-1])
    _check_blocks(recipe, M=M, K=K, N=N, x_shape=tuple(x.shape))
    check_finite(x, "quantized_dot: x")
    check_finite(w_KN, "quantized_dot: w_KN")
    y_MN = _qdot_jit(recipe, x.reshape(M, K), w_KN, key)
    return y_MN.reshape(*x.shape[:-1], N).astype(x.dtype)


def _check_blocks(recipe: LinearRecipe, *, M: int, K: int, N: int, x_shape) -> None:
    # (gemm, operand, role, dim name, contraction length, other dim name, other length)
    checks = [
        ("fprop", recipe.fprop.lhs, "x", "K", K, "M", M),
        ("fprop", recipe.fprop.rhs, "w", "K", K, "N", N),
        ("dgrad", recipe.dgrad.lhs, "dy", "N", N, "M", M),
        ("dgrad", recipe.dgrad.rhs, "w", "N", N, "K", K),
        ("wgrad", recipe.wgrad.lhs, "dy", "M", M, "N", N),
        ("wgrad", recipe.wgrad.rhs, "x", "M", M, "K", K),
    ]
    for gemm, op, role, cname, c, rname, r in checks:
        need = [(cname, c, op.contraction_block()), (rname, r, op.row_block())]
        if op.hadamard:
            need.append((cname, c, TILE))
        for dim, n, b in need:
            if n % b:
                raise ShapeError(
                    f"quantized_dot: {gemm} operand {role} needs {dim}={n} to be a multiple of {b} "
                    f"(block {op.block or 'default'} of {op.fmt}, hadamard={op.hadamard}); "
                    f"x {x_shape}, M={M} tokens, K={K}, N={N}: pad {dim}"
                )


def _operand_key(key, gemm_id: int, side: int):
    if key is None:
        return None
    return jax.random.fold_in(gemm_key(key, gemm_id), side)


def _prepare(a: jax.Array, op: OperandQuant, *, axis: int, key, seed: int, dtype):
    """One GEMM operand, contraction along `axis`: RHT (optional) along it, then quantize along it;
    or, in high precision, cast to the compute dtype `dtype` (x's dtype, as an unquantized layer
    would). Callers transpose the result into the NT layout [rows, contraction]; quantize's draws
    and blocks are defined in that layout, so quantizing along axis 0 and transposing equals
    quantizing the transposed array along its last axis (and avoids a float transpose)."""
    if op.hadamard:
        a = rht(a, axis=axis, seed=seed)
    if not op.quantized:
        return a.astype(dtype)
    k = key if op.rounding == "stochastic" else None
    return quantize(a, op.fmt, block=op.block, axis=axis, rounding=op.rounding, key=k)


def _reuse_fprop_weight(recipe: LinearRecipe) -> bool:
    """dgrad can reuse the fprop weight QTensor, transposed, when it is the same quantization of W
    and the block is square: Q(W)^T == Q(W^T) exactly (why the paper uses 16x16 weight blocks)."""
    f, d = recipe.fprop.rhs, recipe.dgrad.rhs
    return (
        f == d
        and f.quantized
        and f.rounding == "rne"
        and not f.hadamard
        and f.row_block() == f.contraction_block()
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot(recipe: LinearRecipe, x_MK, w_KN, key):
    return _fprop(recipe, x_MK, w_KN, key)[0]


def _fprop(recipe: LinearRecipe, x_MK, w_KN, key):
    seed = recipe.hadamard_seed
    dt = x_MK.dtype
    a_MK = _prepare(
        x_MK, recipe.fprop.lhs, axis=1, key=_operand_key(key, FPROP, 0), seed=seed, dtype=dt
    )
    b_NK = _prepare(
        w_KN, recipe.fprop.rhs, axis=0, key=_operand_key(key, FPROP, 1), seed=seed, dtype=dt
    ).T
    y_MN = qmatmul(a_MK, b_NK, implementation=recipe.implementation, interpret=recipe.interpret)
    return y_MN, b_NK


def _qdot_fwd(recipe: LinearRecipe, x_MK, w_KN, key):
    y_MN, b_NK = _fprop(recipe, x_MK, w_KN, key)
    # wgrad's X operand (X^T [K, M]) is prepared now and kept instead of x: uint8 codes are a
    # quarter of fp32 activations.
    xt_KM = _prepare(
        x_MK,
        recipe.wgrad.rhs,
        axis=0,
        key=_operand_key(key, WGRAD, 1),
        seed=recipe.hadamard_seed,
        dtype=x_MK.dtype,
    ).T
    # QTensor.T moves codes and scales together: W^T [K, N] quantized along N, for free.
    w_for_dgrad = b_NK.T if _reuse_fprop_weight(recipe) else w_KN
    zeros = (jnp.zeros((), x_MK.dtype), jnp.zeros((), w_KN.dtype))  # dtype carriers for the grads
    return y_MN, (w_for_dgrad, xt_KM, key, zeros)


def _qdot_bwd(recipe: LinearRecipe, res, dy_MN):
    w_for_dgrad, xt_KM, key, (x_zero, w_zero) = res
    seed = recipe.hadamard_seed
    dt = x_zero.dtype  # the compute dtype of high-precision operands

    # dgrad: dX[M, K] = dY[M, N] . (W^T[K, N])^T, contraction N.
    a_MN = _prepare(
        dy_MN, recipe.dgrad.lhs, axis=1, key=_operand_key(key, DGRAD, 0), seed=seed, dtype=dt
    )
    if _reuse_fprop_weight(recipe):
        b_KN = w_for_dgrad
    else:
        b_KN = _prepare(
            w_for_dgrad,
            recipe.dgrad.rhs,
            axis=1,
            key=_operand_key(key, DGRAD, 1),
            seed=seed,
            dtype=dt,
        )
    dx_MK = qmatmul(a_MN, b_KN, implementation=recipe.implementation, interpret=recipe.interpret)

    # wgrad: dW[N, K] = dY^T[N, M] . (X^T[K, M])^T, contraction M. Computed as X^T . dY^T^T (the
    # same products) so the result lands in w's [K, N] layout without a transpose.
    dyt_NM = _prepare(
        dy_MN, recipe.wgrad.lhs, axis=0, key=_operand_key(key, WGRAD, 0), seed=seed, dtype=dt
    ).T
    dw_KN = qmatmul(xt_KM, dyt_NM, implementation=recipe.implementation, interpret=recipe.interpret)
    return dx_MK.astype(x_zero.dtype), dw_KN.astype(w_zero.dtype), None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)
# One compiled op when called eagerly; inlined into an enclosing jit.
_qdot_jit = jax.jit(_qdot, static_argnums=(0,))
