"""The one attention entry point the models call.

Every attention layer goes through `attend`: causal attention restricted to each token's own
document (segment ids), grouped-query heads. The sparse-attention kernel and its selection
policies plug in behind this function; callers do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from horizon.config import Attention
from horizon.errors import ShapeError


def document_causal_mask(segment_ids_q_BT: jax.Array, segment_ids_k_BS: jax.Array) -> jax.Array:
    """[B, 1, T, S] bool: key s visible from query t iff s <= t (by index) and same document."""
    T, S = segment_ids_q_BT.shape[1], segment_ids_k_BS.shape[1]
    causal_TS = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    same_BTS = segment_ids_q_BT[:, :, None] == segment_ids_k_BS[:, None, :]
    return (causal_TS[None] & same_BTS)[:, None]


def attend(q_BTHD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array, *, segment_ids_q: jax.Array,
           segment_ids_k: jax.Array, cfg: Attention, layer_index: int = 0) -> jax.Array:
    """Causal, document-masked attention; returns [B, T, H, D] in q's dtype.

    q_BTHD: queries (RoPE applied); k_BSGD, v_BSGD: keys and values with G kv heads dividing H;
    segment_ids_*: int [B, T] / [B, S] document ids (tokens attend only within their document).
    """
    del layer_index  # per-layer policies arrive with the sparse-attention kernel
    B, T, H, D = q_BTHD.shape
    if k_BSGD.shape != v_BSGD.shape or k_BSGD.shape[0] != B or k_BSGD.shape[3] != D:
        raise ShapeError(f"attend: k {k_BSGD.shape} / v {v_BSGD.shape} do not match q {q_BTHD.shape}")
    if H % k_BSGD.shape[2]:
        raise ShapeError(f"attend: kv heads {k_BSGD.shape[2]} do not divide query heads {H}")
    if cfg.policy != "dense_causal":
        raise ShapeError(f"attend: policy {cfg.policy!r} needs the sparse-attention kernel; use 'dense_causal'")
    mask = document_causal_mask(segment_ids_q, segment_ids_k)
    out = jax.nn.dot_product_attention(q_BTHD, k_BSGD, v_BSGD, mask=mask, implementation="xla")
    return out.astype(q_BTHD.dtype)
