"""Shared tolerances and helpers for kernel tests (tokamax-style: per-dtype tolerance times
sqrt of the reduction length)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Per-dtype base tolerances (absolute and relative), scaled by sqrt(contraction length).
_BASE_TOL = {
    jnp.dtype(jnp.float32): 2e-6,
    jnp.dtype(jnp.bfloat16): 8e-3,
    jnp.dtype(jnp.float16): 1e-3,
}


def tolerance(dtype, contraction: int) -> float:
    """Absolute/relative tolerance for a result of `dtype` reduced over `contraction` terms."""
    return _BASE_TOL[jnp.dtype(dtype)] * math.sqrt(max(int(contraction), 1))


def assert_allclose(actual, expected, *, dtype, contraction: int, scale: float = 1.0, err_msg=""):
    """Compare two arrays with the tolerance of `dtype` over a reduction of `contraction` terms."""
    tol = tolerance(dtype, contraction) * scale
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(actual, jnp.float32)),
        np.asarray(jnp.asarray(expected, jnp.float32)),
        rtol=tol,
        atol=tol,
        err_msg=err_msg,
    )


def on_gpu() -> bool:
    """True when the default backend is a GPU (native Pallas/Triton can run)."""
    return jax.default_backend() == "gpu"


def random_normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
