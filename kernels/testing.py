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


def check_outputs_and_grads(candidates: dict, reference, args, *, dtype, contraction: int,
                            scale: float = 1.0, seed: int = 0):
    """Each candidate f(*args) and its VJP (with one fixed random cotangent) against reference.

    candidates: name -> callable with the reference's signature. Everything runs in one jit, so
    one compile serves all. The reference runs on float32 copies of the arguments. Raises an
    AssertionError naming the candidate and the quantity that differs.
    """
    args = tuple(args)
    out_shape = jax.eval_shape(reference, *args)
    cot = random_normal(jax.random.PRNGKey(seed), out_shape.shape, jnp.float32)

    def vjp(f, xs):
        out, pull = jax.vjp(f, *xs)
        return out, pull(cot.astype(out.dtype))

    @jax.jit
    def run(*xs):
        f32 = tuple(x.astype(jnp.float32) for x in xs)
        ref = vjp(reference, f32)
        return ref, {name: vjp(f, xs) for name, f in candidates.items()}

    (ref_out, ref_grads), results = run(*args)
    for name, (out, grads) in results.items():
        assert_allclose(out, ref_out, dtype=dtype, contraction=contraction, scale=scale,
                        err_msg=f"{name}: forward output")
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            # Gradients sum over up to `contraction` keys and queries: same scaling, relative to size.
            mag = float(jnp.max(jnp.abs(rg))) + 1e-6
            assert_allclose(g / mag, rg / mag, dtype=dtype, contraction=contraction, scale=scale,
                            err_msg=f"{name}: gradient of argument {i}")
