"""RMSNorm (Zhang & Sennrich, 2019): x / rms(x) * scale, statistics in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.layers.params import constant, param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Normalize the last axis by its root mean square (computed in fp32), times `scale`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.scale = param(rngs, constant(1.0), (dim,), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
