"""Decoder blocks: pre-norm mixer (attention or an SSM) and SwiGLU MLP, each with a residual.

`MIXER_CLASSES` maps the names of the layer pattern (horizon.config.MIXERS) to mixer modules;
a mixer is built as `cls(cfg, layer_index=i, rngs=rngs)` and called
`mixer(x_BTM, positions_BT=..., segment_ids_BT=..., quant_key=...)`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from horizon.attention.attend import attend
from horizon.attention.rope import apply_rope, rope_for_positions
from horizon.config import Model
from horizon.layers.linear import Linear
from horizon.layers.mlp import SwiGLU
from horizon.layers.norm import RMSNorm
from horizon.quant.assign import (
    ATTN_GEMM_OFFSET,
    MLP_GEMM_OFFSET,
    MLP_LINEARS,
    gemm_id,
    linear_recipe,
)
from horizon.train.sharding import constrain


def compute_dtype(cfg: Model):
    return jnp.dtype(cfg.compute_dtype)


class AttentionMixer(nnx.Module):
    """Grouped-query self-attention with RoPE, routed through horizon.attention.attend."""

    def __init__(self, cfg: Model, *, layer_index: int, rngs: nnx.Rngs):
        H, G, D, M = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        dt = compute_dtype(cfg)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 style residual scaling

        def lin(d_in, d_out, axes, name, std, gid):
            recipe = linear_recipe(cfg, layer_index=layer_index, path=f"layers/{layer_index}/attn/{name}")
            return Linear(d_in, d_out, axes=axes, std=std, rngs=rngs, recipe=recipe,
                          gemm_id=gemm_id(layer_index, ATTN_GEMM_OFFSET + gid), compute_dtype=dt)

        self.q = lin(M, H * D, ("embed", "heads"), "q", cfg.init_std, 0)
        self.k = lin(M, G * D, ("embed", "kv_heads"), "k", cfg.init_std, 1)
        self.v = lin(M, G * D, ("embed", "kv_heads"), "v", cfg.init_std, 2)
        self.o = lin(H * D, M, ("heads", "embed"), "o", out_std, 3)
        self.cfg = cfg
        self.layer_index = layer_index

    def project(self, x_BTM, *, quant_key=None):
        """(q [B, T, H, D], k [B, T, G, D], v [B, T, G, D]) before RoPE."""
        cfg = self.cfg
        B, T, _ = x_BTM.shape
        H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        return (self.q(x_BTM, quant_key=quant_key).reshape(B, T, H, D),
                self.k(x_BTM, quant_key=quant_key).reshape(B, T, G, D),
                self.v(x_BTM, quant_key=quant_key).reshape(B, T, G, D))

    def rope_tables(self, positions_BT):
        """(inverse frequencies [D/2], attention scale) of this layer's RoPE at these positions;
        cfg.rope scaling "none" gives inverse_frequencies(D, theta) and scale 1 (plain RoPE)."""
        cfg = self.cfg
        return rope_for_positions(cfg.head_dim, cfg.rope_theta, cfg.rope, positions_BT)

    def rope(self, x_BTXD, positions_BT):
        """x rotated at positions_BT (queries or keys; X heads)."""
        return apply_rope(x_BTXD, positions_BT, *self.rope_tables(positions_BT))

    def __call__(self, x_BTM, *, positions_BT, segment_ids_BT, quant_key=None, return_kv: bool = False):
        """Attention output [B, T, M]; with return_kv also (k before RoPE, k after RoPE, v), which
        horizon.infer's prefill writes into its caches."""
        cfg = self.cfg
        B, T, _ = x_BTM.shape
        q_BTHD, k_raw_BTGD, v_BTGD = self.project(x_BTM, quant_key=quant_key)
        inv_freq, scale = self.rope_tables(positions_BT)
        q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq, scale)
        k_BTGD = apply_rope(k_raw_BTGD, positions_BT, inv_freq, scale)
        q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "head_dim"))
        out_BTHD = attend(q_BTHD, k_BTGD, v_BTGD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                          cfg=cfg.attention, layer_index=self.layer_index, n_layers=cfg.n_layers,
                          rope_inv_freq=inv_freq)
        y_BTM = self.o(out_BTHD.reshape(B, T, cfg.n_heads * cfg.head_dim), quant_key=quant_key)
        return (y_BTM, (k_raw_BTGD, k_BTGD, v_BTGD)) if return_kv else y_BTM


def _ssd_mixer():
    from horizon.ssm.ssd import Mamba2

    return Mamba2


MIXER_CLASSES = {"attn": lambda: AttentionMixer, "ssd": _ssd_mixer}


class Block(nnx.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Model, *, layer_index: int, rngs: nnx.Rngs):
        mixer_name = cfg.mixers[layer_index]
        self.mixer_name = mixer_name
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = MIXER_CLASSES[mixer_name]()(cfg, layer_index=layer_index, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        recipes = tuple(linear_recipe(cfg, layer_index=layer_index, path=f"layers/{layer_index}/mlp/{n}")
                        for n in MLP_LINEARS)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, rngs=rngs, recipes=recipes,
                          gemm_base=gemm_id(layer_index, MLP_GEMM_OFFSET), compute_dtype=compute_dtype(cfg))

    def __call__(self, x_BTM, *, positions_BT, segment_ids_BT, quant_key=None):
        x_BTM = x_BTM + self.mixer(self.norm1(x_BTM), positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                   quant_key=quant_key)
        x_BTM = constrain(x_BTM, ("batch", "length", "embed"))
        return x_BTM + self.mlp(self.norm2(x_BTM), quant_key=quant_key)
