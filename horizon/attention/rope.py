"""Rotary position embedding (Su et al., 2021, RoFormer, eq. 34), rotate-half convention.

Pair i of a head rotates by angle position * theta^(-2i/D). Scaling variants (PI, NTK, YaRN)
change the inverse frequencies; they extend `inverse_frequencies`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/D) for i in [0, D/2), float32 [D/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate the two halves of each head's features by position * inv_freq (angles in fp32)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)
