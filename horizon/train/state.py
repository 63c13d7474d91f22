"""Training state: a pytree of pure arrays (params as a nested dict, optimizer state, counters).

The model's structure (nnx GraphDef) stays outside, static; `nnx.merge(graphdef, params)` happens
inside the jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: dict
    opt_state: object
    step: jax.Array  # int32: steps taken (skipped ones included); also the data position
    n_skipped: jax.Array  # int32: steps whose update was skipped (non-finite or spike)
    loss_ema: jax.Array  # float32: running mean of accepted losses (spike detection)

    def replace(self, **kw) -> "TrainState":
        return dataclasses.replace(self, **kw)


def init_state(params: dict, optimizer) -> TrainState:
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      n_skipped=jnp.zeros((), jnp.int32), loss_ema=jnp.zeros((), jnp.float32))
