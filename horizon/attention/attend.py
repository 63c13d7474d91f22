"""The one attention entry point the models call.

Every attention layer goes through `attend`: the layer's selection policy (horizon.attention
.policies, chosen by name in config) turns positions, segment ids and, for dynamic policies, the
queries and keys into a Selection, and kernels.sparse_attention.attend computes attention over the
live blocks with in-kernel causal, window and document masks. Dense causal attention is the
Selection with every causal block live; the kernel is the same.
"""

from __future__ import annotations

import inspect

import jax

from horizon.attention import policies, ring
from horizon.config import Attention
from horizon.errors import ShapeError
from kernels.sparse_attention import attend as sparse_attend


def policy_kwargs(cfg: Attention) -> dict:
    """The config's arguments for its policy: block sizes, window and sinks where the policy takes
    them, then `cfg.options` ("budget=8,stride=4")."""
    params = inspect.signature(policies.get(cfg.policy)).parameters
    kw = {"block_q": cfg.block, "block_k": cfg.block}
    if "window" in params:
        kw["window"] = cfg.window
    if "n_sinks" in params:
        kw["n_sinks"] = cfg.n_sinks
    kw.update(cfg.policy_options)
    return kw


def attend(q_BTHD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array, *, positions_BT: jax.Array,
           segment_ids_BT: jax.Array, cfg: Attention, layer_index: int = 0, n_layers: int = 1,
           rope_inv_freq: jax.Array | None = None) -> jax.Array:
    """Self-attention under the layer's policy; returns [B, T, H, D] in q's dtype.

    q_BTHD: queries (RoPE applied); k_BSGD, v_BSGD: keys and values (S = T) with G kv heads
    dividing H; positions_BT / segment_ids_BT: int [B, T] per-document positions and document ids
    (tokens attend only within their document); rope_inv_freq [D/2]: the layer's RoPE frequencies,
    for policies that remap key positions (StreamingLLM sinks, LongHeads).
    """
    B, T, H, D = q_BTHD.shape
    if k_BSGD.shape != v_BSGD.shape or k_BSGD.shape[:2] != (B, T) or k_BSGD.shape[3] != D:
        raise ShapeError(f"attend: k {k_BSGD.shape} / v {v_BSGD.shape} do not match q {q_BTHD.shape}")
    if H % k_BSGD.shape[2]:
        raise ShapeError(f"attend: kv heads {k_BSGD.shape[2]} do not divide query heads {H}")
    sel = policies.build(cfg.policy, positions_BT, segment_ids_BT, q_BTHD=q_BTHD, k_BSGD=k_BSGD, v_BSGD=v_BSGD,
                         layer=layer_index, n_layers=n_layers, rope_inv_freq=rope_inv_freq, **policy_kwargs(cfg))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and dict(mesh.shape).get("context", 1) > 1:
        # The sequence is sharded over `context`: ring attention over the Selection's live blocks.
        out = ring.context_parallel_attention(q_BTHD, k_BSGD, v_BSGD, segment_ids_BT=segment_ids_BT,
                                              block_live=sel)
    else:
        out = sparse_attend(q_BTHD, k_BSGD, v_BSGD, sel, implementation=cfg.implementation,
                            softcap=cfg.softcap or None)
    return out.astype(q_BTHD.dtype)
