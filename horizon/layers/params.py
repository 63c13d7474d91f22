"""Parameter creation with logical axis names (resolved to mesh axes by horizon.train.sharding)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype=jnp.float32) -> nnx.Param:
    """An nnx.Param initialised by `init(key, shape, dtype)` carrying logical axis names `axes`."""
    assert len(axes) == len(shape), (shape, axes)
    # Sharding is applied once to the whole state (jit out_shardings), not eagerly per variable.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def normal(std: float) -> Callable:
    return jax.nn.initializers.normal(std)


def constant(value: float) -> Callable:
    return jax.nn.initializers.constant(value)
