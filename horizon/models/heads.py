"""Training objectives over the LM's outputs. Next-token cross-entropy, averaged per token;
multi-token prediction as n parallel heads on a shared trunk (Gloeckle et al., 2024, "Better &
Faster Large Language Models via Multi-token Prediction") or as sequential modules sharing the
embedding and output head (DeepSeek-V3, 2024, §2.2); horizon-length prediction on
fill-in-the-middle samples (Ding et al., 2024, "Horizon-Length Prediction").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.config import Model
from horizon.layers.linear import Linear
from horizon.layers.norm import RMSNorm
from horizon.models.blocks import Block


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log p(target) per position, fp32 [B, T]."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy over positions with weight > 0 (a token's loss counts once, whatever its document)."""
    ce = token_cross_entropy(logits_BTV, targets_BT)
    w = weights_BT.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


# ---- multi-token prediction ------------------------------------------------------------------------

def shift_left(x_BT: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, t + k] at t, `fill` where t + k runs past the window."""
    if k == 0:
        return x_BT
    pad = jnp.full((x_BT.shape[0], k), fill, x_BT.dtype)
    return jnp.concatenate([x_BT[:, k:], pad], axis=1)


def future_targets(targets_BT: jax.Array, weights_BT: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets `depth` tokens beyond the next one: position t predicts token t + 1 + depth, i.e.
    targets[t + depth]; its weight is the product of weights[t .. t + depth] (every step stays in
    the document) and 0 past the window."""
    w = weights_BT.astype(jnp.float32)
    for j in range(1, depth + 1):
        w = w * shift_left(weights_BT.astype(jnp.float32), j)
    return shift_left(targets_BT, depth), w


def multi_token_loss(depth_logits: list[jax.Array], targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Mean over depths d = 1..D of the per-token cross-entropy of depth_logits[d - 1] [B, T, V]
    against future_targets(..., d)."""
    losses = []
    for d, logits in enumerate(depth_logits, start=1):
        t, w = future_targets(targets_BT, weights_BT, d)
        losses.append(next_token_loss(logits, t, w))
    return sum(losses) / len(losses)


class ParallelMTP(nnx.Module):
    """Gloeckle et al. (2024): head d is its own transformer block on the shared trunk, then the
    shared unembedding, predicting token t + 1 + d. Our trunk is the whole main stack, so the
    next-token path (head 0) is the unchanged LM."""

    def __init__(self, cfg: Model, *, rngs: nnx.Rngs):
        # The heads take the last layer's mixer kind (and its quantization treatment).
        self.blocks = nnx.List([Block(cfg, layer_index=cfg.n_layers - 1, rngs=rngs)
                                for _ in range(cfg.objective.mtp_depth)])
        self.norms = nnx.List([RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
                               for _ in range(cfg.objective.mtp_depth)])

    def __call__(self, lm, trunk_BTM, tokens_BT, *, positions_BT, segment_ids_BT, quant_key=None):
        del tokens_BT  # parallel heads read only the trunk
        out = []
        for block, norm in zip(self.blocks, self.norms):
            h = block(trunk_BTM, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, quant_key=quant_key)
            out.append(lm.logits(norm(h)))
        return out


class SequentialMTP(nnx.Module):
    """DeepSeek-V3 §2.2: module d combines the previous depth's state with the embedding of token
    t + d, h'_d = W_d [RMSNorm(h_(d-1)); RMSNorm(Emb(x_(t+d)))] (eq. 21), runs a transformer block
    (eq. 22) and predicts token t + 1 + d through the shared output head (eq. 23); h_0 is the trunk."""

    def __init__(self, cfg: Model, *, rngs: nnx.Rngs):
        D, M = cfg.objective.mtp_depth, cfg.d_model
        self.h_norms = nnx.List([RMSNorm(M, eps=cfg.norm_eps, rngs=rngs) for _ in range(D)])
        self.e_norms = nnx.List([RMSNorm(M, eps=cfg.norm_eps, rngs=rngs) for _ in range(D)])
        self.projs = nnx.List([Linear(2 * M, M, axes=(None, "embed"), std=cfg.init_std, rngs=rngs)
                               for _ in range(D)])
        self.blocks = nnx.List([Block(cfg, layer_index=cfg.n_layers - 1, rngs=rngs) for _ in range(D)])
        self.out_norms = nnx.List([RMSNorm(M, eps=cfg.norm_eps, rngs=rngs) for _ in range(D)])

    def __call__(self, lm, trunk_BTM, tokens_BT, *, positions_BT, segment_ids_BT, quant_key=None):
        out, h = [], trunk_BTM
        for d, (hn, en, proj, block, on) in enumerate(
                zip(self.h_norms, self.e_norms, self.projs, self.blocks, self.out_norms), start=1):
            e_BTM = lm.embed(shift_left(tokens_BT, d)).astype(h.dtype)
            h = proj(jnp.concatenate([hn(h), en(e_BTM)], axis=-1))
            h = block(h, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, quant_key=quant_key)
            out.append(lm.logits(on(h)))
        return out


MTP_CLASSES = {"parallel": ParallelMTP, "sequential": SequentialMTP}


# ---- horizon-length prediction ---------------------------------------------------------------------

class HLPHead(nnx.Module):
    """A linear read-out of the final hidden state to the fraction of middle tokens still to come,
    squashed into (0, 1) by a sigmoid (the targets' range)."""

    def __init__(self, cfg: Model, *, rngs: nnx.Rngs):
        self.proj = Linear(cfg.d_model, 1, axes=("embed", None), std=cfg.init_std, rngs=rngs)

    def __call__(self, h_BTM: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.proj(h_BTM.astype(jnp.float32))[..., 0].astype(jnp.float32))


def horizon_length_loss(pred_BT: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Mean absolute error |pred - (M - t) / M| over weighted positions: an L1 regression of the
    normalized horizon length."""
    w = weights_BT.astype(jnp.float32)
    return jnp.sum(jnp.abs(pred_BT.astype(jnp.float32) - targets_BT) * w) / jnp.maximum(jnp.sum(w), 1.0)


# ---- the full objective ----------------------------------------------------------------------------

def objective_loss(model, batch: dict, quant_key=None) -> jax.Array:
    """next-token + mtp_weight * multi_token_loss + hlp_weight * horizon_length_loss, as
    `model.cfg.objective` says; `batch` as horizon.data.batches (hlp_* keys when HLP is on)."""
    obj = model.cfg.objective
    kw = {"positions_BT": batch["positions"], "segment_ids_BT": batch["segment_ids"], "quant_key": quant_key}
    trunk_BTM = model.trunk(batch["inputs"], **kw)
    h_BTM = model.final_norm(trunk_BTM)
    loss = next_token_loss(model.logits(h_BTM), batch["targets"], batch["weights"])
    if obj.mtp != "none":
        depth_logits = model.mtp(model, trunk_BTM, batch["inputs"], **kw)
        loss = loss + obj.mtp_weight * multi_token_loss(depth_logits, batch["targets"], batch["weights"])
    if obj.hlp_weight > 0:
        pred_BT = model.hlp(h_BTM)
        loss = loss + obj.hlp_weight * horizon_length_loss(pred_BT, batch["hlp_targets"], batch["hlp_weights"])
    return loss
