"""Round-to-nearest-even and stochastic rounding onto element grids, and the key derivation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from horizon.quant import gemm_key, layer_key
from horizon.quant.rounding import round_to_grid, uniform
from tests.quant import _reference as ref


def _grid(elem) -> np.ndarray:
    """Every finite non-negative value of the format, by enumeration of its codes."""
    if elem == "e2m1":
        return ref.E2M1_GRID.astype(np.float32)
    dt = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[elem]
    v = np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def _probes(grid):
    mids = (grid[:-1] + grid[1:]) / 2
    off = np.concatenate(
        [mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), grid, [grid[-1] * 1.5]]
    )
    return np.concatenate([off, -off]).astype(np.float32)


def _rne_brute_force(v, grid, elem):
    """Nearest grid value, ties to the even code (index parity), saturating at the max."""
    m = np.minimum(np.abs(v), grid[-1]).astype(np.float64)
    d = np.abs(m[:, None] - grid[None].astype(np.float64))
    best = d == d.min(1, keepdims=True)
    # index parity = mantissa parity in every one of these formats (consecutive codes)
    even = best & (np.arange(len(grid)) % 2 == 0)
    idx = np.where(even.any(1), even.argmax(1), best.argmax(1))
    return np.where(np.signbit(v), -grid[idx], grid[idx]).astype(np.float32)


@pytest.mark.parametrize("elem", ["e2m1", "e4m3", "e5m2"])
def test_rne_matches_brute_force_nearest_even(elem):
    grid = _grid(elem)
    v = _probes(grid)
    got = np.asarray(jax.jit(lambda v: round_to_grid(v, elem))(jnp.asarray(v)))
    np.testing.assert_array_equal(got, _rne_brute_force(v, grid, elem))


@pytest.mark.parametrize("elem", ["e2m1", "e4m3"])
def test_stochastic_rounding_lands_on_a_neighbour(elem):
    grid = _grid(elem)
    v = np.random.default_rng(0).uniform(-grid[-1], grid[-1], 4096).astype(np.float32)
    u = uniform(jax.random.key(0), v.shape)
    got = np.abs(np.asarray(round_to_grid(jnp.asarray(v), elem, "stochastic", u)))
    m = np.abs(v)
    lo = grid[np.searchsorted(grid, m, side="right") - 1]
    hi = grid[np.minimum(np.searchsorted(grid, m, side="left"), len(grid) - 1)]
    assert ((got == lo) | (got == hi)).all()


@pytest.mark.parametrize("elem", ["e2m1", "e4m3"])
def test_stochastic_rounding_is_unbiased(elem):
    # Mean of n draws: |mean - v| < 5 sigma with sigma <= ulp / (2 sqrt(n)); RNE is far outside.
    grid = _grid(elem)
    v = np.random.default_rng(1).uniform(-grid[-1], grid[-1], 64).astype(np.float32)
    n = 4096
    u = uniform(jax.random.key(7), (n, v.size))
    draws = jax.jit(
        lambda u: round_to_grid(jnp.broadcast_to(jnp.asarray(v), u.shape), elem, "stochastic", u)
    )(u)
    mean = np.asarray(draws, np.float64).mean(0)
    idx = np.searchsorted(grid, np.abs(v), side="right")
    ulp = grid[np.minimum(idx, len(grid) - 1)] - grid[idx - 1]
    bound = 5 * ulp / (2 * np.sqrt(n)) + 1e-6
    assert (np.abs(mean - v) < bound).all(), np.max(np.abs(mean - v) / bound)
    rne = np.asarray(round_to_grid(jnp.asarray(v), elem))
    assert (np.abs(rne - v) > bound).any()  # the bound would catch a deterministic rounding


def test_uniform_draws_are_reproducible_uniform_and_key_dependent():
    a = np.asarray(uniform(jax.random.key(3), (256, 256)))
    np.testing.assert_array_equal(a, np.asarray(uniform(jax.random.key(3), (256, 256))))
    assert (a != np.asarray(uniform(jax.random.key(4), (256, 256)))).mean() > 0.99
    assert a.min() >= 0.0 and a.max() < 1.0
    counts = np.histogram(a, bins=16, range=(0, 1))[0]
    expected = a.size / 16
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 50  # 15 dof: p ~ 1e-5
    # neighbouring elements are not correlated
    assert abs(np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]) < 0.02


def test_keys_fold_step_layer_and_gemm():
    step_key = jax.random.key(11)
    k = gemm_key(layer_key(step_key, 3), 2)
    want = jax.random.fold_in(jax.random.fold_in(step_key, 3), 2)
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(want))
    other = gemm_key(layer_key(step_key, 3), 1)
    assert (np.asarray(jax.random.key_data(other)) != np.asarray(jax.random.key_data(k))).any()


def test_nvfp4_stochastic_quantize_is_unbiased_over_keys():
    from horizon.quant import dequantize, quantize

    x = jax.random.normal(jax.random.key(0), (4, 64))
    n = 1024
    keys = jax.random.split(jax.random.key(1), n)
    deq = jax.jit(
        jax.vmap(lambda k: dequantize(quantize(x, "nvfp4", rounding="stochastic", key=k)))
    )(keys)
    mean = np.asarray(deq, np.float64).mean(0)
    q = quantize(x, "nvfp4")
    decode = np.repeat(np.asarray(q.scale_values()), 16, axis=1) * float(q.tensor_scale)
    # the widest E2M1 gap (2) times the block's decode scale bounds each draw's spread
    bound = 5 * 2 * decode / (2 * np.sqrt(n))
    # A block max above 6 * decode scale (its E4M3 scale rounded down) saturates: biased by design.
    inside = np.abs(np.asarray(x)) <= 6 * decode
    assert inside.mean() > 0.9
    assert (np.abs(mean - np.asarray(x)) < bound)[inside].all()
    rne_err = np.abs(np.asarray(dequantize(q)) - np.asarray(x))
    assert rne_err.mean() > 3 * np.abs(mean - np.asarray(x)).mean()
