"""Decoder blocks: pre-norm mixer (attention or an SSM) and SwiGLU MLP, each with a residual.

`MIXER_CLASSES` maps the names of the layer pattern (horizon.config.MIXERS) to mixer modules;
a mixer is built as `cls(cfg, layer_index=i, rngs=rngs)` and called
`mixer(x_BTM, positions_BT=..., segment_ids_BT=..., quant_key=...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.attention.attend import attend
from horizon.attention.rope import apply_rope, rope_for_positions
from horizon.config import Model
from horizon.layers.linear import Linear
from horizon.layers.mlp import SwiGLU
from horizon.layers.norm import RMSNorm
from horizon.train.sharding import constrain


def compute_dtype(cfg: Model):
    return jnp.dtype(cfg.compute_dtype)


ATTN_LINEARS = ("q", "k", "v", "o")
MLP_LINEARS = ("gate", "up", "down")


def linear_paths(cfg: Model) -> list[str]:
    """The module path of every quantizable linear layer ("layers/3/attn/q"), as recipes match them."""
    paths = []
    for i, mixer in enumerate(cfg.mixers):
        if mixer == "attn":
            paths += [f"layers/{i}/attn/{n}" for n in ATTN_LINEARS]
        paths += [f"layers/{i}/mlp/{n}" for n in MLP_LINEARS]
    return paths


def linear_recipe(cfg: Model, *, layer_index: int, path: str):
    """The quantization treatment of the linear layer at `path` ("layers/3/attn/q") in block
    `layer_index`: a horizon.quant LinearRecipe, or None for high precision.

    With `quant.high_precision_from` set, the model is built twice (horizon.train.loop): with the
    configured fraction (early phase) and with 0.0 (the late, high-precision phase, NVFP4 paper
    app. D), so the recipe is resolved at a fixed (step 0 of 1).
    """
    if cfg.quant.recipe == "bf16":
        return None
    import dataclasses

    from horizon.quant.recipe import get_recipe, resolve

    recipe = get_recipe(cfg.quant.recipe)
    if cfg.quant.high_precision_from is None:
        return resolve(recipe, layer_index=layer_index, n_layers=cfg.n_layers, path=path)
    recipe = dataclasses.replace(recipe, high_precision_from=cfg.quant.high_precision_from,
                                 high_precision_scope=cfg.quant.high_precision_scope)
    return resolve(recipe, layer_index=layer_index, n_layers=cfg.n_layers, path=path, step=0, total_steps=1)


class AttentionMixer(nnx.Module):
    """Grouped-query self-attention with RoPE, routed through horizon.attention.attend."""

    def __init__(self, cfg: Model, *, layer_index: int, rngs: nnx.Rngs):
        H, G, D, M = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        dt = compute_dtype(cfg)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 style residual scaling

        def lin(d_in, d_out, axes, name, std, gid):
            recipe = linear_recipe(cfg, layer_index=layer_index, path=f"layers/{layer_index}/attn/{name}")
            return Linear(d_in, d_out, axes=axes, std=std, rngs=rngs, recipe=recipe,
                          gemm_id=layer_index * 16 + gid, compute_dtype=dt)

        self.q = lin(M, H * D, ("embed", "heads"), "q", cfg.init_std, 0)
        self.k = lin(M, G * D, ("embed", "kv_heads"), "k", cfg.init_std, 1)
        self.v = lin(M, G * D, ("embed", "kv_heads"), "v", cfg.init_std, 2)
        self.o = lin(H * D, M, ("heads", "embed"), "o", out_std, 3)
        self.cfg = cfg
        self.layer_index = layer_index

    def __call__(self, x_BTM, *, positions_BT, segment_ids_BT, quant_key=None):
        cfg = self.cfg
        B, T, _ = x_BTM.shape
        H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # cfg.rope scaling "none" gives inverse_frequencies(D, theta) and scale 1 (plain RoPE)
        inv_freq, scale = rope_for_positions(D, cfg.rope_theta, cfg.rope, positions_BT)
        q_BTHD = apply_rope(self.q(x_BTM, quant_key=quant_key).reshape(B, T, H, D), positions_BT, inv_freq, scale)
        k_BTGD = apply_rope(self.k(x_BTM, quant_key=quant_key).reshape(B, T, G, D), positions_BT, inv_freq, scale)
        v_BTGD = self.v(x_BTM, quant_key=quant_key).reshape(B, T, G, D)
        q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "head_dim"))
        out_BTHD = attend(q_BTHD, k_BTGD, v_BTGD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                          cfg=cfg.attention, layer_index=self.layer_index, n_layers=cfg.n_layers,
                          rope_inv_freq=inv_freq)
        return self.o(out_BTHD.reshape(B, T, H * D), quant_key=quant_key)


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
                          gemm_base=layer_index * 16 + 8, compute_dtype=compute_dtype(cfg))

    def __call__(self, x_BTM, *, positions_BT, segment_ids_BT, quant_key=None):
        kw = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)
        if self.mixer_name == "attn":
            kw["quant_key"] = quant_key
        x_BTM = x_BTM + self.mixer(self.norm1(x_BTM), **kw)
        x_BTM = constrain(x_BTM, ("batch", "length", "embed"))
        return x_BTM + self.mlp(self.norm2(x_BTM), quant_key=quant_key)
