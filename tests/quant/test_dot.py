"""quantized_dot: each of the three GEMMs against an explicit quantize -> dequantize -> matmul
composition written here, from the recipe's documented operand layouts and key derivation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.errors import ConfigError, ShapeError
from horizon.quant import (
    DGRAD,
    FPROP,
    WGRAD,
    GemmQuant,
    LinearRecipe,
    NonFiniteError,
    OperandQuant,
    dequantize,
    get_recipe,
    quantize,
    quantized_dot,
    rht,
)
from kernels.testing import assert_allclose

M, K, N = 32, 64, 64
HI = jax.lax.Precision.HIGHEST


def _data(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (M, K))
    w = jax.random.normal(k2, (K, N)) * 0.2
    c = jax.random.normal(k3, (M, N))  # the cotangent dY, through the loss sum(y * c)
    return x, w, c


def _q(a, op: OperandQuant, key):
    """Reference operand a [rows, contraction]: RHT, then quantize-dequantize along the last axis."""
    if op.hadamard:
        a = rht(a, axis=1)
    if op.fmt is None:
        return a
    k = key if op.rounding == "stochastic" else None
    return dequantize(quantize(a, op.fmt, block=op.block, axis=-1, rounding=op.rounding, key=k))


def _okey(key, gemm, side):
    return jax.random.fold_in(jax.random.fold_in(key, gemm), side)


@jax.jit(static_argnums=0)
def _reference(recipe: LinearRecipe, x, w, c, key):
    """(y, dx, dw) composed by hand: fprop Y = X W^T, dgrad dX = dY W, wgrad dW = dY^T X."""
    y = jnp.dot(
        _q(x, recipe.fprop.lhs, _okey(key, FPROP, 0)),
        _q(w.T, recipe.fprop.rhs, _okey(key, FPROP, 1)).T,
        precision=HI,
    )
    dx = jnp.dot(
        _q(c, recipe.dgrad.lhs, _okey(key, DGRAD, 0)),
        _q(w, recipe.dgrad.rhs, _okey(key, DGRAD, 1)).T,
        precision=HI,
    )
    dw_NK = jnp.dot(
        _q(c.T, recipe.wgrad.lhs, _okey(key, WGRAD, 0)),
        _q(x.T, recipe.wgrad.rhs, _okey(key, WGRAD, 1)).T,
        precision=HI,
    )
    return y, dx, dw_NK.T


@jax.jit(static_argnums=0)
def _run(recipe, x, w, c, key):
    """(y, dx, dw) of quantized_dot with cotangent c."""
    y, vjp = jax.vjp(lambda x, w: quantized_dot(x, w, recipe, key), x, w)
    return (y, *vjp(c))


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_1d_weights", "fp8"])
def test_three_gemms_equal_quantize_dequantize_matmul_composition(name):
    recipe = get_recipe(name).linear
    x, w, c = _data()
    key = jax.random.key(5)
    y, dx, dw = _run(recipe, x, w, c, key)
    ry, rdx, rdw = _reference(recipe, x, w, c, key)
    assert_allclose(y, ry, dtype=jnp.float32, contraction=K, err_msg="fprop")
    assert_allclose(dx, rdx, dtype=jnp.float32, contraction=N, err_msg="dgrad")
    assert_allclose(dw, rdw, dtype=jnp.float32, contraction=M, err_msg="wgrad")


def test_backward_is_quantized_not_straight_through():
    recipe = get_recipe("nvfp4").linear
    x, w, c = _data(1)
    _, dx, dw = _run(recipe, x, w, c, jax.random.key(0))
    full_dx, full_dw = c @ w.T, x.T @ c
    # a straight-through estimator would return the full-precision products of dY with W and X
    assert float(jnp.abs(dx - full_dx).max()) > 1e-2 * float(jnp.abs(full_dx).max())
    assert float(jnp.abs(dw - full_dw).max()) > 1e-2 * float(jnp.abs(full_dw).max())
    # ... while staying an estimate of them
    assert float(jnp.linalg.norm(dw - full_dw) / jnp.linalg.norm(full_dw)) < 0.3


def test_each_gemm_sees_only_its_own_operands():
    # Quantize one GEMM at a time: the other two must then be exact full-precision products.
    x, w, c = _data(2)
    q = OperandQuant(fmt="nvfp4")
    for gemm in ("fprop", "dgrad", "wgrad"):
        recipe = dataclasses.replace(LinearRecipe(), **{gemm: GemmQuant(lhs=q, rhs=q)})
        y, dx, dw = _run(recipe, x, w, c, None)
        ry, rdx, rdw = _reference(recipe, x, w, c, jax.random.key(0))
        for name, got, want, n in (
            ("fprop", y, ry, K),
            ("dgrad", dx, rdx, N),
            ("wgrad", dw, rdw, M),
        ):
            assert_allclose(
                got, want, dtype=jnp.float32, contraction=n, err_msg=f"{gemm} quantized: {name}"
            )
        exact = {"fprop": (y, x @ w), "dgrad": (dx, c @ w.T), "wgrad": (dw, x.T @ c)}
        quantized_err = float(jnp.abs(exact[gemm][0] - exact[gemm][1]).max())
        assert quantized_err > 1e-3, gemm


def test_wgrad_rht_cancels_in_product_without_quantization():
    # RHT on both wgrad operands and no quantization: dW must equal the plain product.
    hp_rht = OperandQuant(hadamard=True)
    recipe = LinearRecipe(wgrad=GemmQuant(lhs=hp_rht, rhs=hp_rht))
    x, w, c = _data(3)
    _, dx, dw = _run(recipe, x, w, c, None)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(x.T @ c), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(c @ w.T), rtol=1e-5, atol=1e-5)


def test_high_precision_recipe_is_the_plain_dot():
    x, w, c = _data(4)
    y, dx, dw = _run(LinearRecipe(), x, w, c, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(c @ w.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(x.T @ c), rtol=1e-5, atol=1e-5)


def test_leading_dims_are_flattened_and_dtypes_kept():
    q = OperandQuant(fmt="nvfp4")
    recipe = LinearRecipe(fprop=GemmQuant(lhs=q, rhs=q), dgrad=GemmQuant(lhs=q, rhs=q))
    x, w, c = _data(5)
    x3, c3 = x.reshape(2, 16, K).astype(jnp.bfloat16), c.reshape(2, 16, N).astype(jnp.bfloat16)
    y3, dx3, dw = _run(recipe, x3, w, c3, jax.random.PRNGKey(1))  # raw uint32 keys work too
    assert y3.dtype == dx3.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert y3.shape == (2, 16, N) and dx3.shape == (2, 16, K)
    ry = _q(x3.reshape(M, K), q, None) @ _q(w.T, q, None).T
    assert_allclose(y3.reshape(M, N), ry, dtype=jnp.bfloat16, contraction=K)
    rdw = x3.reshape(M, K).astype(jnp.float32).T @ c3.reshape(M, N).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(rdw), rtol=1e-4, atol=1e-3)


def test_gradients_reproducible_for_a_key_and_vary_across_keys():
    recipe = get_recipe("nvfp4").linear
    x, w, c = _data(6)
    a = _run(recipe, x, w, c, jax.random.key(9))
    b = _run(recipe, x, w, c, jax.random.key(9))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    d = _run(recipe, x, w, c, jax.random.key(10))
    assert float(jnp.abs(a[2] - d[2]).max()) > 0  # another key, other stochastic rounding
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(d[0]))  # fprop is all RNE


def test_contraction_not_multiple_of_block_names_shape_and_block():
    recipe = get_recipe("nvfp4").linear
    with pytest.raises(
        ShapeError, match=r"fprop operand x needs K=40 to be a multiple of 16.*\(8, 40\)"
    ):
        quantized_dot(jnp.ones((8, 40)), jnp.ones((40, 32)), recipe, jax.random.key(0))
    with pytest.raises(ShapeError, match=r"wgrad operand dy needs M=24 to be a multiple of 16"):
        quantized_dot(jnp.ones((24, 32)), jnp.ones((32, 32)), recipe, jax.random.key(0))
    with pytest.raises(ShapeError, match="do not match"):
        quantized_dot(jnp.ones((16, 32)), jnp.ones((16, 32)), recipe, jax.random.key(0))


def test_stochastic_recipe_without_key_is_a_config_error():
    with pytest.raises(ConfigError, match="key"):
        quantized_dot(jnp.ones((16, 32)), jnp.ones((32, 16)), get_recipe("nvfp4").linear, None)


def test_nonfinite_input_under_jit_gives_nan_output_and_raises_eagerly():
    recipe = get_recipe("nvfp4_no_sr").linear
    x, w, _ = _data(7)
    with pytest.raises(NonFiniteError, match="quantized_dot: w_KN"):
        quantized_dot(x, w.at[3, 3].set(jnp.inf), recipe)
    y = jax.jit(lambda x: quantized_dot(x, w, recipe))(x.at[0, 0].set(jnp.nan))
    assert np.isnan(np.asarray(y)).all()
