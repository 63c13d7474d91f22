"""Self-speculative decoding with the model's own multi-token-prediction heads as the draft (Gloeckle
et al., 2024, "Better & Faster Large Language Models via Multi-token Prediction", Sec. 3.2; the
blockwise parallel decoding of Stern et al., 2018, "Blockwise Parallel Decoding for Deep
Autoregressive Models", with its verify and predict substeps merged into one model call).

Parallel head d (horizon.models.heads.ParallelMTP) reads the trunk at position t and predicts token
t + 1 + d. Each round is one target pass (`extend`) over the last token and the k drafts: the main
head's distributions verify the drafts with the acceptance rule of horizon.infer.speculative, and
the heads at the last kept position propose the next round's k drafts, so there is no draft model
and no draft pass. Each head block keeps its own full KV cache of the trunk (its attention reads
every earlier position), rolled back with the target's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.config import Decode
from horizon.errors import ConfigError
from horizon.infer import cache as kv
from horizon.infer import step as steps
from horizon.infer.generate import check_prompts
from horizon.infer.sampling import draw, token_probs
from horizon.infer.speculative import (
    SpeculativeResult,
    accept_drafts,
    emitted_tokens,
    keep_accepted,
    require_attention_only,
    run_rounds,
)


def mtp_depth_used(model, k: int | None = None) -> int:
    """The number of draft tokens per round (k heads, default all); ConfigError if the model has no
    parallel MTP heads, is not attention-only, or has fewer than k heads."""
    cfg = model.cfg
    obj = cfg.objective
    if obj.mtp == "none":
        raise ConfigError("MTP speculative decoding drafts with the model's multi-token-prediction heads and this "
                          "model has none (model.objective.mtp='none'); train with --model.objective.mtp parallel, "
                          "or use speculative_generate (a window-cache draft)")
    if obj.mtp != "parallel":
        raise ConfigError(f"MTP speculative decoding needs parallel heads (model.objective.mtp='parallel'), not "
                          f"{obj.mtp!r}: a sequential module reads the embedding of the token before its target, "
                          "so its drafts would take one pass per depth; use speculative_generate")
    require_attention_only(cfg, "MTP speculative decoding")
    k = obj.mtp_depth if k is None else k
    if not 1 <= k <= obj.mtp_depth:
        raise ConfigError(f"MTP speculative decoding: k={k} draft tokens per round must be in [1, "
                          f"{obj.mtp_depth}], the model's model.objective.mtp_depth")
    return k


def forward(model, caches: list, tokens_BT: jax.Array, k: int):
    """One target pass over tokens_BT [B, T] at each row's next positions: (main-head logits
    [B, T, V], head logits [B, k, T, V] (head d at t predicts token t + 1 + d), caches). `caches`:
    the model's layers' full caches, then one per head block."""
    L = model.cfg.n_layers
    trunk_BTM, main = steps.extend_layers(model.layers, caches[:L], model.embed(tokens_BT))
    trunk_BTM = trunk_BTM.astype(jnp.dtype(model.cfg.compute_dtype))
    logits_BTV = model.logits(model.final_norm(trunk_BTM)).astype(jnp.float32)
    heads, head_caches = [], []
    for d in range(k):
        # Head block d reads the trunk (not token embeddings) and keeps its own cache of it.
        h_BTM, (c,) = steps.extend_layers([model.mtp.blocks[d]], caches[L + d:L + d + 1], trunk_BTM)
        heads.append(model.logits(model.mtp.norms[d](h_BTM)).astype(jnp.float32))
        head_caches.append(c)
    return logits_BTV, jnp.stack(heads, axis=1), main + head_caches


def init_caches(model, k: int, *, batch: int, capacity: int) -> list:
    """Full caches for the model's layers and its first k head blocks."""
    full = Decode(cache="full")
    return (steps.init_caches(model, full, batch=batch, capacity=capacity)
            + steps.init_caches(model, full, batch=batch, capacity=capacity, layers=model.mtp.blocks[:k]))


def mtp_speculative_generate(model, tokens_BP, lengths_B=None, *, decode: Decode | None = None,
                             k: int | None = None) -> SpeculativeResult:
    """Sample decode.max_new_tokens tokens from `model`, drafting k tokens per round (default: one
    per MTP head) with its parallel MTP heads. tokens_BP: right-padded prompts [B, P] (int; lengths_B
    [B], default all P). Temperature and top_p apply to the main head (p) and to the heads (q);
    temperature 0 gives exactly the target's greedy tokens. The target keeps a full cache and
    attends every cached token (the full selection, as speculative_generate's verification does)."""
    k = mtp_depth_used(model, k)
    d = decode or Decode()
    if d.cache != "full" or d.policy != "full":
        raise ConfigError(f"MTP speculative decoding verifies with a full cache and the full policy, not "
                          f"decode.cache={d.cache!r}, decode.policy={d.policy!r}; leave both at 'full'")
    V = model.cfg.vocab_size
    tokens_BP, lengths_B = check_prompts(tokens_BP, lengths_B, V, what="mtp_speculative_generate")
    B, P = tokens_BP.shape
    tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
    # a round writes k + 1 slots past the last kept token before cutting back
    capacity = max(P, int(lengths_B.max()) + d.max_new_tokens + k + 1)
    graphdef, state = nnx.split(model)
    rows = jnp.arange(B)

    def probs(logits_XV):  # over any leading axes (token_probs takes [B, V])
        p = token_probs(logits_XV.reshape(-1, V), temperature=d.temperature, top_p=d.top_p)
        return p.reshape(logits_XV.shape)

    def propose(key, heads_BKTV, t_B):
        """The next round's drafts [B, k] and their distributions q [B, k, V]: head j at position
        t_B, the last kept one, predicts token t_B + 1 + j (the next token is t_B + 1)."""
        q_BKV = probs(heads_BKTV[rows, :, t_B])
        return draw(key, q_BKV.reshape(B * k, V)).reshape(B, k), q_BKV

    @jax.jit
    def start(state, key):
        m = nnx.merge(graphdef, state)
        caches = init_caches(m, k, batch=B, capacity=capacity)
        # The prompt goes through extend from empty caches, so every head cache gets the trunk at
        # every prompt position; right padding lands after each prompt and is cut off at once.
        logits_BPV, heads_BKPV, caches = forward(m, caches, tokens_BP, k)
        caches = [kv.with_length(c, lengths_B) for c in caches]
        k_first, k_draft = jax.random.split(key)
        first_B = draw(k_first, probs(logits_BPV[rows, lengths_B - 1]))
        drafts_BK, q_BKV = propose(k_draft, heads_BKPV, jnp.asarray(lengths_B) - 1)
        return first_B, (caches, first_B, drafts_BK, q_BKV)

    @jax.jit
    def round_(state, caches, last_B, drafts_BK, q_BKV, key):
        m = nnx.merge(graphdef, state)
        k_acc, k_draft = jax.random.split(key)
        old_len = [c.length for c in caches]
        logits_BTV, heads_BKTV, caches = forward(m, caches, jnp.concatenate([last_B[:, None], drafts_BK], 1), k)
        n_B, next_B = accept_drafts(k_acc, probs(logits_BTV), q_BKV, drafts_BK)
        caches = keep_accepted(caches, old_len, n_B)
        new_drafts_BK, new_q_BKV = propose(k_draft, heads_BKTV, n_B)
        return emitted_tokens(drafts_BK, n_B, next_B), n_B, (caches, next_B, new_drafts_BK, new_q_BKV)

    key = jax.random.PRNGKey(d.seed)
    first_B, carry = start(state, jax.random.fold_in(key, 0))
    return run_rounds(first_B, carry, lambda c, r: round_(state, *c, jax.random.fold_in(key, r)), d, k)
