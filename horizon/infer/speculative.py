"""Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al., 2023, "Accelerating LLM Decoding with Speculative Sampling",
Algorithm 2). A draft proposes k tokens from q; the target scores them in one pass (`extend`) and
keeps draft token x with probability min(1, p(x) / q(x)); at the first rejection it draws from
norm(max(0, p - q)); if all k are kept it draws a bonus token from p. The emitted tokens follow
the target distribution exactly.

The draft here is the same model under a window + sinks cache (constant-size KV, LongSpec, 2025):
its cache is snapshotted after each draft token, so a rejection rolls it back by selecting a
snapshot; the target's full cache rolls back by cutting its length.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.config import Decode
from horizon.errors import ConfigError
from horizon.infer import cache as kv
from horizon.infer import step as steps
from horizon.infer.generate import to_left_padded
from horizon.infer.sampling import draw, token_probs
from horizon.infer.selectors import get_selector


def acceptance_prob(p_V: jax.Array, q_V: jax.Array, x) -> jax.Array:
    """min(1, p(x) / q(x)): the chance a draft token x ~ q is kept (Leviathan et al., Alg. 1)."""
    return jnp.minimum(1.0, p_V[x] / jnp.maximum(q_V[x], 1e-30))


def residual(p_V: jax.Array, q_V: jax.Array) -> jax.Array:
    """norm(max(0, p - q)), the distribution drawn from after a rejection (p itself if p == q, when
    a rejection cannot happen)."""
    r = jnp.maximum(p_V - q_V, 0.0)
    total = r.sum()
    return jnp.where(total > 0, r / jnp.where(total > 0, total, 1.0), p_V)


def accept_draft(key: jax.Array, p_KV: jax.Array, q_KV: jax.Array, draft_K: jax.Array):
    """(n accepted in [0, k], the next token) for one row.

    p_KV [k + 1, V]: target distributions after the prefix and after each draft token; q_KV [k, V]:
    the draft's distributions the draft tokens draft_K [k] were drawn from.
    """
    k = draft_K.shape[0]
    k_u, k_next = jax.random.split(key)
    u_K = jax.random.uniform(k_u, (k,))
    a_K = jax.vmap(acceptance_prob)(p_KV[:k], q_KV, draft_K)
    rejected = u_K >= a_K
    n = jnp.where(jnp.any(rejected), jnp.argmax(rejected), k)
    q_pad = jnp.concatenate([q_KV, jnp.zeros_like(q_KV[:1])])  # after k accepts: the bonus, from p
    dist = jnp.where(n < k, residual(p_KV[n], q_pad[n]), p_KV[n])
    return n.astype(jnp.int32), draw(k_next, dist[None])[0]


class SpeculativeResult(NamedTuple):
    tokens: list  # per row, the generated tokens (int32 arrays)
    accepted: np.ndarray  # [rounds, B] draft tokens accepted per round
    mean_accepted: float  # mean accepted draft tokens per round (of k)


def speculative_generate(model, tokens_BP, lengths_B=None, *, decode: Decode | None = None, draft_cache_size: int = 64,
                         n_sinks: int = 4, k: int = 4) -> SpeculativeResult:
    """Sample decode.max_new_tokens tokens from `model` (target: full cache) with `model` under a
    window + sinks cache of `draft_cache_size` slots as the draft, k draft tokens per round.
    tokens_BP: right-padded prompts [B, P]. Sampling (temperature, top_p) applies to both models;
    temperature 0 gives exactly the target's greedy tokens."""
    cfg = model.cfg
    if any(m != "attn" for m in cfg.mixers):
        raise ConfigError("speculative decoding rolls caches back by length and snapshot; it needs an "
                          f"attention-only model, not layer_pattern {cfg.layer_pattern!r}")
    if k < 1:
        raise ConfigError(f"speculative: k={k} draft tokens per round must be >= 1")
    d = decode or Decode()
    tokens_BP = np.asarray(tokens_BP, np.int32)
    B, P = tokens_BP.shape
    lengths_B = np.full((B,), P, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
    target_dec = dataclasses.replace(d, cache="full", cache_size=None, policy="full", options="")
    draft_dec = Decode(cache="streaming", cache_size=draft_cache_size, n_sinks=n_sinks)
    capacity = int(lengths_B.max()) + d.max_new_tokens + k + 1
    multiple = 1 if cfg.attention.policy == "dense_causal" else cfg.attention.block
    left = jnp.asarray(to_left_padded(tokens_BP, lengths_B, multiple=multiple))
    graphdef, state = nnx.split(model)
    probs = jax.tree_util.Partial(token_probs, temperature=d.temperature, top_p=d.top_p)
    sel = get_selector("full")

    @jax.jit
    def start(state, key):
        m = nnx.merge(graphdef, state)
        tc = steps.init_caches(m, target_dec, batch=B, capacity=capacity)
        dc = steps.init_caches(m, draft_dec, batch=B, capacity=draft_cache_size)
        logits, tc = steps.prefill(m, tc, left, lengths_B)
        _, dc = steps.prefill(m, dc, left, lengths_B)
        return draw(key, probs(logits)), tc, dc

    @jax.jit
    def round_(state, tc, dc, last_B, key):
        m = nnx.merge(graphdef, state)
        k_draft, k_acc = jax.random.split(key)
        no_states = [None] * len(dc)

        def draft_step(carry, i):
            caches, tok = carry
            logits, caches, _ = steps.decode_step(m, caches, tok, sel, no_states)
            q = probs(logits)
            nxt = draw(jax.random.fold_in(k_draft, i), q)
            return (caches, nxt), (caches, q, nxt)

        # k + 1 feeds (last, d1..dk): snapshot j holds the prefix plus j + 1 of them
        _, (snaps, q_KBV, d_KB) = jax.lax.scan(draft_step, (dc, last_B), jnp.arange(k + 1))
        drafts_BK = d_KB[:k].T
        old_len = [c.length for c in tc]
        p_logits, tc = steps.extend(m, tc, jnp.concatenate([last_B[:, None], drafts_BK], axis=1))
        p_BKV = jax.vmap(probs, in_axes=1, out_axes=1)(p_logits)
        n_B, nxt_B = jax.vmap(accept_draft)(jax.random.split(k_acc, B), p_BKV, jnp.moveaxis(q_KBV[:k], 0, 1),
                                            drafts_BK)
        tc = [kv.with_length(c, L + 1 + n_B) for c, L in zip(tc, old_len)]
        rows = jnp.arange(B)
        dc = jax.tree.map(lambda x: x[n_B, rows], snaps)
        emitted_BK1 = jnp.concatenate([drafts_BK, jnp.zeros((B, 1), jnp.int32)], axis=1)
        emitted_BK1 = emitted_BK1.at[rows, n_B].set(nxt_B)
        return emitted_BK1, n_B, nxt_B, tc, dc

    key = jax.random.PRNGKey(d.seed)
    first, tc, dc = start(state, jax.random.fold_in(key, 0))
    out = [[int(t)] for t in np.asarray(first)]
    done = [t in d.stop_tokens for t in np.asarray(first)]
    last, accepted, r = first, [], 0
    while not all(done or len(o) >= d.max_new_tokens for done, o in zip(done, out)):
        r += 1
        emitted, n, last, tc, dc = round_(state, tc, dc, last, jax.random.fold_in(key, r))
        emitted, n = np.asarray(emitted), np.asarray(n)
        accepted.append(n)
        for b in range(B):
            for t in emitted[b, :n[b] + 1]:
                if done[b] or len(out[b]) >= d.max_new_tokens:
                    break
                out[b].append(int(t))
                done[b] = int(t) in d.stop_tokens
    acc = np.array(accepted, np.int32).reshape(-1, B)
    return SpeculativeResult([np.array(o, np.int32) for o in out], acc, float(acc.mean()) if acc.size else 0.0)
