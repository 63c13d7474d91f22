"""The SSD specification: Mamba-2's selective state-space recurrence as a plain sequential scan.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t h_t + D x_t      (Dao & Gu, 2024, eq. 1-2)

with the state reset to zero where the segment id changes (document boundaries). Slow and exact:
the chunked paths (xla.py, pallas_triton.py) are tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_resets(segment_ids_BT: jax.Array | None, T: int, batch: int) -> jax.Array:
    """reset[b, t] = True where token t starts a new segment (never at t = 0: the initial state
    belongs to the segment of the first token)."""
    if segment_ids_BT is None:
        return jnp.zeros((batch, T), bool)
    change = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), bool), change], axis=1)


def ssd_reference(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H=None, initial_state_BHPN=None,
                  segment_ids_BT=None) -> tuple[jax.Array, jax.Array]:
    """Sequential SSD in float32. Returns (y [B,T,H,P] in x's dtype, final state [B,H,P,N] f32)."""
    batch, T, H, P = x_BTHP.shape
    G, N = B_BTGN.shape[2:]
    f32 = jnp.float32
    rep = H // G  # heads per group share B and C
    B_BTHN = jnp.repeat(B_BTGN.astype(f32), rep, axis=2)
    C_BTHN = jnp.repeat(C_BTGN.astype(f32), rep, axis=2)
    h0 = (jnp.zeros((batch, H, P, N), f32) if initial_state_BHPN is None
          else initial_state_BHPN.astype(f32))
    reset_BT = segment_resets(segment_ids_BT, T, batch)

    def step(h_BHPN, inputs):
        x_BHP, dt_BH, B_BHN, C_BHN, reset_B = inputs
        h_BHPN = jnp.where(reset_B[:, None, None, None], 0.0, h_BHPN)
        decay_BH = jnp.exp(dt_BH * A_H.astype(f32))
        inject_BHPN = (dt_BH[..., None] * x_BHP)[..., None] * B_BHN[:, :, None, :]
        h_BHPN = decay_BH[..., None, None] * h_BHPN + inject_BHPN
        y_BHP = jnp.einsum("bhpn,bhn->bhp", h_BHPN, C_BHN, precision=jax.lax.Precision.HIGHEST)
        return h_BHPN, y_BHP

    xs = (x_BTHP.astype(f32), dt_BTH.astype(f32), B_BTHN, C_BTHN, reset_BT)
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)
    h_final, y_TBHP = jax.lax.scan(step, h0, xs)
    y_BTHP = jnp.moveaxis(y_TBHP, 0, 1)
    if D_H is not None:
        y_BTHP = y_BTHP + D_H.astype(f32)[:, None] * x_BTHP.astype(f32)
    return y_BTHP.astype(x_BTHP.dtype), h_final
