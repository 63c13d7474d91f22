"""Linear layer whose GEMMs follow a quantization recipe resolved from config by layer path.

Model code never branches on quantization: each Linear receives its treatment (a horizon.quant
LinearRecipe, or None for high precision) at construction and applies it in `__call__`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.layers.params import normal, param


class Linear(nnx.Module):
    """y[..., N] = x[..., K] @ w[K, N]; weights stored [in, out] with logical axes `axes`."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], std: float,
                 rngs: nnx.Rngs, recipe=None, gemm_id: int = 0, compute_dtype=jnp.float32):
        self.kernel = param(rngs, normal(std), (d_in, d_out), axes)
        self.recipe = recipe  # static: a horizon.quant LinearRecipe or None (high precision)
        self.gemm_id = gemm_id  # folds into the stochastic-rounding key: reproducible per layer
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array, *, quant_key: jax.Array | None = None) -> jax.Array:
        w_KN = self.kernel[...]
        if self.recipe is None:
            return jnp.dot(x.astype(self.compute_dtype), w_KN.astype(self.compute_dtype),
                           preferred_element_type=jnp.float32).astype(self.compute_dtype)
        from horizon.quant.dot import quantized_dot  # quantization is optional machinery

        key = jax.random.PRNGKey(0) if quant_key is None else quant_key
        y = quantized_dot(x, w_KN, self.recipe, jax.random.fold_in(key, self.gemm_id))
        return y.astype(self.compute_dtype)
