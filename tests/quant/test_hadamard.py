"""The random Hadamard transform: orthogonal, seeded, tile-wise, and cancelling in the product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.errors import ShapeError
from horizon.quant import hadamard_matrix, rht


def test_matrix_is_orthogonal_signed_hadamard_over_four():
    r = hadamard_matrix(0).astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-7)
    assert set(np.unique(np.abs(r))) == {0.25}
    # rows are +-1 times the rows of Sylvester's H16 (a random sign per row)
    h = np.array([[1.0]])
    for _ in range(4):
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    h /= 4
    signs = r[:, 0] / h[:, 0]
    np.testing.assert_array_equal(r, signs[:, None] * h)
    assert (signs < 0).any() and (signs > 0).any()


def test_matrix_is_fixed_by_seed():
    np.testing.assert_array_equal(hadamard_matrix(5), hadamard_matrix(5))
    assert (hadamard_matrix(5) != hadamard_matrix(6)).any()


@pytest.mark.parametrize("axis", [0, 1])
def test_rht_is_a_block_diagonal_matmul_along_axis(axis):
    x = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32)
    n = x.shape[axis]
    big = np.kron(np.eye(n // 16), hadamard_matrix(1).astype(np.float64))  # tile' = tile @ R
    want = x.astype(np.float64) @ big if axis == 1 else (x.T.astype(np.float64) @ big).T
    np.testing.assert_allclose(
        np.asarray(rht(jnp.asarray(x), axis=axis, seed=1)), want, rtol=1e-5, atol=1e-5
    )


def test_rht_cancels_in_the_product():
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (24, 64))
    b = jax.random.normal(k2, (40, 64))
    got = rht(a, axis=1) @ rht(b, axis=1).T
    np.testing.assert_allclose(np.asarray(got), np.asarray(a @ b.T), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(rht(a, axis=1) - a)).max() > 0.1  # it did transform


def test_rht_spreads_an_outlier_over_its_tile():
    x = jnp.zeros((1, 32)).at[0, 3].set(16.0)
    y = np.asarray(rht(x, axis=1))
    np.testing.assert_allclose(np.abs(y[0, :16]), 4.0)
    np.testing.assert_array_equal(y[0, 16:], 0.0)


def test_rht_rejects_non_multiple_of_tile():
    with pytest.raises(ShapeError, match=r"x.shape\[1\]=20.*tile 16"):
        rht(jnp.ones((2, 20)), axis=1)
