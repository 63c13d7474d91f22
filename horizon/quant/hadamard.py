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
from kernels.qmatmul.quantize_pallas import rht_last_axis

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
    # The fused quantize kernel's butterfly (signs, then stages 1, 2, 4, 8 of (a + b, a - b), then
    # * 0.25): a fixed summation order, so this spec and the kernel agree bit for bit on every
    # backend, where a matmul's summation order would not.
    signs = hadamard_matrix(seed)[:, 0] * np.sqrt(TILE)  # column 0 of H16 is all ones
    mask = int(sum(1 << i for i, s in enumerate(signs) if s < 0))
    y = rht_last_axis(jnp.moveaxis(x.astype(jnp.float32), axis, -1), mask)
    return jnp.moveaxis(y, -1, axis)
