"""Decoder-only language model built from the layer pattern in horizon.config.Model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.config import Model
from horizon.layers.embed import Embed
from horizon.layers.linear import Linear
from horizon.layers.norm import RMSNorm
from horizon.models.blocks import Block, compute_dtype
from horizon.models.heads import MTP_CLASSES, HLPHead
from horizon.quant.assign import linear_paths
from horizon.train.sharding import constrain


class LM(nnx.Module):
    """tokens [B, T] -> logits [B, T, V] (fp32). Embedding, LM head and norms stay high precision."""

    def __init__(self, cfg: Model, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs, compute_dtype=compute_dtype(cfg))
        self.layers = nnx.List([Block(cfg, layer_index=i, rngs=rngs) for i in range(cfg.n_layers)])
        if cfg.quant.recipe != "bf16":
            from horizon.quant.recipe import check_rules, get_recipe

            # Warns, naming the rule, when a keep-in-high-precision rule matches no layer. The
            # embedding and head are high precision by construction; their paths let the
            # recipe's rule for them count as matched.
            check_rules(get_recipe(cfg.quant.recipe), ["embed", "head", *linear_paths(cfg)], n_layers=cfg.n_layers)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), std=cfg.init_std, rngs=rngs,
            compute_dtype=jnp.float32)
        # Auxiliary objective heads (created last so the main parameters draw the same init).
        if cfg.objective.mtp != "none":
            self.mtp = MTP_CLASSES[cfg.objective.mtp](cfg, rngs=rngs)
        if cfg.objective.hlp_weight > 0:
            self.hlp = HLPHead(cfg, rngs=rngs)

    def hidden(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, quant_key=None) -> jax.Array:
        """Final-norm hidden states [B, T, M] (what output heads read)."""
        return self.final_norm(self.trunk(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                          quant_key=quant_key))

    def trunk(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, quant_key=None) -> jax.Array:
        """Residual stream after the last block, before the final norm, [B, T, M] (what MTP heads read)."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.zeros((B, T), jnp.int32)
        x_BTM = constrain(self.embed(tokens_BT), ("batch", "length", "embed"))
        for block in self.layers:
            x_BTM = block(x_BTM, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, quant_key=quant_key)
        return x_BTM

    def logits(self, h_BTM: jax.Array) -> jax.Array:
        if self.head is None:
            return self.embed.attend(h_BTM)
        return self.head(h_BTM.astype(jnp.float32)).astype(jnp.float32)

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, quant_key=None) -> jax.Array:
        h = self.hidden(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, quant_key=quant_key)
        return constrain(self.logits(h), ("batch", "length", "vocab"))


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def with_config(model: LM, cfg: Model) -> LM:
    """`model`'s parameters under another model config with the same parameter structure (e.g. a
    RoPE scaling or attention policy changed for evaluation); ConfigError if the structure differs."""
    from horizon.errors import ConfigError

    _, state = nnx.split(model)
    new_graphdef, new_abstract = nnx.split(nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0))))
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(s))
    if shapes(state) != shapes(new_abstract):
        raise ConfigError("with_config: the new model config changes the parameters; change only settings "
                          "such as model.rope or model.attention that keep them")
    return nnx.merge(new_graphdef, state)
