"""SwiGLU MLP (Shazeer, 2020, "GLU Variants Improve Transformer"): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
from flax import nnx

from horizon.layers.linear import Linear
from horizon.train.sharding import constrain


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, std: float, rngs: nnx.Rngs, recipes=(None, None, None),
                 gemm_base: int = 0, compute_dtype=None):
        kw = dict(std=std, rngs=rngs, compute_dtype=compute_dtype)
        self.gate = Linear(d_model, d_ff, axes=("embed", "mlp"), recipe=recipes[0], gemm_id=gemm_base, **kw)
        self.up = Linear(d_model, d_ff, axes=("embed", "mlp"), recipe=recipes[1], gemm_id=gemm_base + 1, **kw)
        self.down = Linear(d_ff, d_model, axes=("mlp", "embed"), recipe=recipes[2], gemm_id=gemm_base + 2, **kw)

    def __call__(self, x_BTM: jax.Array, *, quant_key=None) -> jax.Array:
        h_BTF = jax.nn.silu(self.gate(x_BTM, quant_key=quant_key)) * self.up(x_BTM, quant_key=quant_key)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return self.down(h_BTF, quant_key=quant_key)
