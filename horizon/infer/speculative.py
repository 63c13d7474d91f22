"""Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al., 2023, "Accelerating LLM Decoding with Speculative Sampling",
Algorithm 2). A draft proposes k tokens from q; the target scores them in one pass (`extend`) and
keeps draft token x with probability min(1, p(x) / q(x)); at the first rejection it draws from
norm(max(0, p - q)); if all k are kept it draws a bonus token from p. The emitted tokens follow
the target distribution exactly.

The draft here is the same model under a window + sinks cache (constant-size KV, LongSpec, 2025):
its cache is snapshotted after each draft token, so a rejection rolls it back by selecting a
snapshot; the target's full cache rolls back by cutting its length. horizon.infer.mtp_draft drafts
with the model's own MTP heads instead and shares the acceptance rule, rollback and host loop here.
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


def accept_drafts(key: jax.Array, p_BK1V: jax.Array, q_BKV: jax.Array, drafts_BK: jax.Array):
    """accept_draft for each row: (n [B] accepted, next token [B])."""
    return jax.vmap(accept_draft)(jax.random.split(key, drafts_BK.shape[0]), p_BK1V, q_BKV, drafts_BK)


def emitted_tokens(drafts_BK: jax.Array, n_B: jax.Array, next_B: jax.Array) -> jax.Array:
    """[B, k + 1]: a round's output, the first n_B draft tokens then the next token (later columns are
    not emitted)."""
    B = drafts_BK.shape[0]
    out_BK1 = jnp.concatenate([drafts_BK, jnp.zeros((B, 1), jnp.int32)], axis=1)
    return out_BK1.at[jnp.arange(B), n_B].set(next_B)


def keep_accepted(caches: list, old_lengths: list, n_B: jax.Array) -> list:
    """Full caches that took a round's k + 1 fed tokens (the last token and k drafts) cut back to the
    last token and the n_B accepted drafts: the rejected slots are masked and later overwritten."""
    return [kv.with_length(c, L + 1 + n_B) for c, L in zip(caches, old_lengths)]


def require_attention_only(cfg, what: str) -> None:
    """ConfigError unless every layer is attention (a Mamba-2 state cannot be rolled back by length)."""
    if any(m != "attn" for m in cfg.mixers):
        raise ConfigError(f"{what} rolls KV caches back after a rejection, which a Mamba-2 state cannot do; it "
                          f"needs an attention-only model, not layer_pattern {cfg.layer_pattern!r}")


class SpeculativeResult(NamedTuple):
    tokens: list  # per row, the generated tokens (int32 arrays)
    accepted: np.ndarray  # [rounds, B] draft tokens accepted per round
    mean_accepted: float  # mean accepted draft tokens per round (of k), over rows still generating
    active: np.ndarray  # [rounds, B] bool: the row still needed tokens when the round began
    k: int  # draft tokens per round

    def acceptance_by_depth(self) -> np.ndarray:
        """[k]: the fraction of active rounds whose j-th draft token (j = 1..k) was accepted, i.e.
        n >= j (draft j counts only once drafts 1..j-1 were kept)."""
        n = self.accepted[self.active]
        return np.array([float(np.mean(n >= j)) if n.size else 0.0 for j in range(1, self.k + 1)])

    def tokens_per_forward(self) -> float:
        """Generated tokens per target forward, averaged over rows, the prefill counted as one
        forward (plain decoding: 1.0; each round adds one verify forward)."""
        forwards_B = 1 + self.active.sum(axis=0)
        return float(np.mean([len(t) / f for t, f in zip(self.tokens, forwards_B)]))


def run_rounds(first_B, carry, round_fn, d: Decode, k: int) -> SpeculativeResult:
    """The host loop every draft shares: row b starts with first_B[b], and each round
    round_fn(carry, r) -> (emitted [B, k + 1], n [B], carry) adds the n + 1 tokens it emits, until
    the row has d.max_new_tokens tokens or emitted a stop token."""
    first = np.asarray(first_B)
    B = len(first)
    out = [[int(t)] for t in first]
    stopped = [int(t) in d.stop_tokens for t in first]
    accepted, active, r = [], [], 0
    while True:
        live = [not (s or len(o) >= d.max_new_tokens) for s, o in zip(stopped, out)]
        if not any(live):
            break
        r += 1
        emitted, n, carry = round_fn(carry, r)
        emitted, n = np.asarray(emitted), np.asarray(n)
        accepted.append(n)
        active.append(live)
        for b in np.flatnonzero(live):
            for t in emitted[b, :n[b] + 1]:
                if stopped[b] or len(out[b]) >= d.max_new_tokens:
                    break
                out[b].append(int(t))
                stopped[b] = int(t) in d.stop_tokens
    acc = np.array(accepted, np.int32).reshape(-1, B)
    act = np.array(active, bool).reshape(-1, B)
    return SpeculativeResult([np.array(o, np.int32) for o in out], acc,
                             float(acc[act].mean()) if act.any() else 0.0, act, k)


def speculative_generate(model, tokens_BP, lengths_B=None, *, decode: Decode | None = None, draft_cache_size: int = 64,
                         n_sinks: int = 4, k: int = 4) -> SpeculativeResult:
    """Sample decode.max_new_tokens tokens from `model` (target: full cache) with `model` under a
    window + sinks cache of `draft_cache_size` slots as the draft, k draft tokens per round.
    tokens_BP: right-padded prompts [B, P]. Sampling (temperature, top_p) applies to both models;
    temperature 0 gives exactly the target's greedy tokens."""
    cfg = model.cfg
    require_attention_only(cfg, "speculative decoding")
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
        n_B, nxt_B = accept_drafts(k_acc, p_BKV, jnp.moveaxis(q_KBV[:k], 0, 1), drafts_BK)
        tc = keep_accepted(tc, old_len, n_B)
        dc = jax.tree.map(lambda x: x[n_B, jnp.arange(B)], snaps)
        return emitted_tokens(drafts_BK, n_B, nxt_B), n_B, (tc, dc, nxt_B)

    key = jax.random.PRNGKey(d.seed)
    first, tc, dc = start(state, jax.random.fold_in(key, 0))
    return run_rounds(first, (tc, dc, first),
                      lambda carry, r: round_(state, *carry, jax.random.fold_in(key, r)), d, k)
