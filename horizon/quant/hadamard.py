"""Random Hadamard transform (RHT) of "Pretraining Large Language Models with NVFP4" (NVIDIA, 2025),
section 4.2: 16-wide tiles along the contraction dim times R = diag(signs) H16 / 4, an orthogonal
matrix with a fixed random sign vector. Applied to both Wgrad operands, it cancels in the product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from horizon.errors import ShapeError

TILE = 16


@functools.cache
def _matrix(seed: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < TILE:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), TILE)
    out = (signs[:, None] * h / np.sqrt(TILE)).astype(np.float32)
    out.setflags(write=False)
    return out


def hadamard_matrix(seed: int = 0) -> np.ndarray:
    """R[16, 16] = diag(signs) @ H16 / 4 (float32, read-only), signs +-1 from `seed`; R R^T = I."""
    return _matrix(int(seed))


def rht(x: jax.Array, *, axis: int, seed: int = 0) -> jax.Array:
    """Apply R to every 16-wide tile of `x` along `axis`: tile' = tile @ R. float32, x's shape.

    For the Wgrad GEMM dW = dY^T X, transforming both dY and X along the token axis (the
    contraction) leaves the product unchanged, since R R^T = I, while spreading outliers across
    each tile before quantization.
    """
    axis %= x.ndim
    n = x.shape[axis]
    if n % TILE:
        raise ShapeError(
            f"rht: x.shape[{axis}]={n} (shape {tuple(x.shape)}) is not a multiple of the Hadamard "
            f"tile {TILE}; pad it to a multiple of {TILE}"
        )
    return _rht(x, axis=axis, seed=int(seed))


@functools.partial(jax.jit, static_argnames=("axis", "seed"))
def _rht(x: jax.Array, *, axis: int, seed: int) -> jax.Array:
    n = x.shape[axis]
    x = x.astype(jnp.float32)
    tiles = x.reshape(*x.shape[:axis], n // TILE, TILE, *x.shape[axis + 1 :])
    r = jnp.asarray(hadamard_matrix(seed))
    # One einsum that keeps every other dim in place: no transposes around the small matmul.
    letters = "abcdefghklmnopqrstuvwxyz"[: tiles.ndim]
    i = letters[axis + 1]
    out_sub = letters.replace(i, "j")
    # HIGHEST: on GPUs the default fp32 matmul precision is TF32, which would round the inputs.
    out = jnp.einsum(f"{letters},{i}j->{out_sub}", tiles, r, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(x.shape)
