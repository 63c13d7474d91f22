"""Generation: `generate` (prefill through the model's forward, then one compiled `lax.while_loop`
over cached decode steps, horizon.infer.step) with greedy, temperature and top-p sampling, batches
of left- or right-padded prompts, stop tokens and streaming of tokens in chunks; and `sample`, the
older decoder by full recomputation over a fixed-length buffer (no cache; kept for the quickstart).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.config import Decode
from horizon.errors import ConfigError, ShapeError
from horizon.infer import step as steps
from horizon.infer.cache import cache_bytes
from horizon.infer.sampling import sample_token
from horizon.infer.selectors import SELECTORS, get_selector


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, N] int32 generated tokens, -1 after a row stopped
    lengths: np.ndarray  # [B] tokens generated per row (a stop token counts)
    cache_bytes: int  # bytes of every layer's cache (KV and SSM state)


class _Carry(NamedTuple):
    i: jax.Array  # [] next output column
    caches: Any
    layer_states: Any
    last_B: jax.Array  # the token to feed next
    out_BN: jax.Array
    done_B: jax.Array
    key: jax.Array


def check_prompts(tokens_BP, lengths_B, vocab_size: int, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], lengths [B] int32, default all P) after checking them: a ShapeError naming
    `what` for a non-int or non-2-D array, lengths outside [1, P], or tokens outside the vocabulary."""
    tokens_BP = np.asarray(tokens_BP)
    if tokens_BP.ndim != 2 or not np.issubdtype(tokens_BP.dtype, np.integer):
        raise ShapeError(f"{what}: prompts must be an int array [batch, length], got {tokens_BP.dtype} "
                         f"{tokens_BP.shape}; use pad_prompts(list_of_arrays)")
    B, P = tokens_BP.shape
    lengths_B = np.full((B,), P, np.int32) if lengths_B is None else np.asarray(lengths_B, np.int32)
    if lengths_B.shape != (B,) or lengths_B.min() < 1 or lengths_B.max() > P:
        raise ShapeError(f"{what}: lengths {lengths_B.tolist()} must be {B} values in [1, {P}]")
    if tokens_BP.min() < 0 or tokens_BP.max() >= vocab_size:
        raise ShapeError(f"{what}: prompt tokens must be in [0, {vocab_size}), got "
                         f"[{tokens_BP.min()}, {tokens_BP.max()}]")
    return tokens_BP, lengths_B


def pad_prompts(prompts, *, padding: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] int32, lengths [B]) from a list of 1-D token arrays, padded with zeros."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    P = int(lengths.max())
    out = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        if padding == "right":
            out[b, :len(p)] = p
        else:
            out[b, P - len(p):] = p
    return out, lengths


def to_left_padded(tokens_BP, lengths_B, *, multiple: int = 1):
    """Right-padded prompts as left-padded ones, widened on the left to a multiple of `multiple`."""
    P = tokens_BP.shape[1]
    W = -(-P // multiple) * multiple
    j = np.arange(W)[None, :]
    src = j - (W - lengths_B[:, None])
    vals = np.take_along_axis(tokens_BP, np.clip(src, 0, P - 1), axis=1)
    return np.where(src >= 0, vals, 0).astype(np.int32)


class Decoder:
    """Cached decoding of `model` under `decode`: split once, two jitted pure functions of the state
    (prefill + first token, and the while loop run up to a given column)."""

    def __init__(self, model, decode: Decode | None = None):
        decode = decode or Decode()
        self.model, self.decode = model, decode
        self.graphdef, self.state = nnx.split(model)
        options = dict(decode.policy_options)
        if "n_layers" in inspect.signature(SELECTORS.get(decode.policy, object)).parameters:
            options.setdefault("n_layers", model.cfg.n_layers)  # depth-dependent defaults (TidalDecode)
        self.selector = get_selector(decode.policy, options)
        self._start = jax.jit(self._start_fn, static_argnames=("capacity", "max_new"))
        self._run = jax.jit(self._run_fn)

    def _sample(self, key, logits_BV):
        d = self.decode
        return sample_token(key, logits_BV, temperature=d.temperature, top_p=d.top_p)

    def _stopped(self, tok_B):
        stops = jnp.asarray(self.decode.stop_tokens, jnp.int32).reshape(-1)
        return jnp.any(tok_B[:, None] == stops[None, :], axis=-1)

    def _start_fn(self, state, tokens_BP, lengths_B, key, *, capacity: int, max_new: int):
        model = nnx.merge(self.graphdef, state)
        caches = steps.init_caches(model, self.decode, batch=tokens_BP.shape[0], capacity=capacity)
        logits, caches = steps.prefill(model, caches, tokens_BP, lengths_B)
        layer_states = steps.prepare_selector(self.selector, caches, model)
        tok = self._sample(jax.random.fold_in(key, 0), logits)
        out = jnp.full((tokens_BP.shape[0], max_new), -1, jnp.int32).at[:, 0].set(tok)
        return _Carry(jnp.ones((), jnp.int32), caches, layer_states, tok, out, self._stopped(tok), key)

    def _run_fn(self, state, carry: _Carry, until):
        model = nnx.merge(self.graphdef, state)

        def cond(c):
            return (c.i < until) & ~jnp.all(c.done_B)

        def body(c):
            logits, caches, layer_states = steps.decode_step(model, c.caches, c.last_B, self.selector,
                                                             c.layer_states)
            tok = jnp.where(c.done_B, -1, self._sample(jax.random.fold_in(c.key, c.i), logits))
            done = c.done_B | self._stopped(tok)
            out = c.out_BN.at[:, c.i].set(tok)
            return _Carry(c.i + 1, caches, layer_states, jnp.maximum(tok, 0), out, done, c.key)

        return jax.lax.while_loop(cond, body, carry)

    def __call__(self, tokens_BP, lengths_B=None, *, padding: str = "right",
                 on_tokens: Callable[[np.ndarray], None] | None = None, chunk: int | None = None) -> Generation:
        """Generate for prompts tokens_BP [B, P] (int; lengths_B [B], default all P) padded on the
        `padding` side. on_tokens(new [B, n]) is called after every `chunk` tokens (default: once)."""
        d, cfg = self.decode, self.model.cfg
        tokens_BP, lengths_B = check_prompts(tokens_BP, lengths_B, cfg.vocab_size, what="generate")
        if padding not in ("left", "right"):
            raise ConfigError(f"generate: padding={padding!r} must be 'left' or 'right'")
        if padding == "left":  # back to right-padded, the layout to_left_padded widens
            tokens_BP = to_left_padded(tokens_BP[:, ::-1], lengths_B)[:, ::-1]
            tokens_BP = np.ascontiguousarray(tokens_BP)
        multiple = 1 if cfg.attention.policy == "dense_causal" else cfg.attention.block
        left = to_left_padded(tokens_BP, lengths_B, multiple=multiple)
        N = d.max_new_tokens
        needed = int(lengths_B.max()) + N - 1  # the last token is never fed back
        capacity = d.cache_size if d.cache_size is not None else int(lengths_B.max()) + N
        if d.cache in ("full", "paged") and capacity < needed:
            raise ConfigError(f"decode.cache_size: a prompt of {int(lengths_B.max())} tokens plus "
                              f"{N} new tokens needs {needed} cache slots but the {d.cache} cache holds "
                              f"{capacity}; raise --cache-size or use --cache streaming (its fixed size "
                              "evicts old tokens)")
        carry = self._start(self.state, jnp.asarray(left), jnp.asarray(lengths_B), jax.random.PRNGKey(d.seed),
                            capacity=capacity, max_new=N)
        shown = 0
        chunk = chunk or N
        while True:
            i = int(carry.i)
            if on_tokens is not None and i > shown:
                on_tokens(np.asarray(carry.out_BN[:, shown:i]))
                shown = i
            if i >= N or bool(jnp.all(carry.done_B)):
                break
            carry = self._run(self.state, carry, jnp.asarray(min(i + chunk, N), jnp.int32))
        out = np.asarray(carry.out_BN)
        return Generation(out, (out >= 0).sum(1).astype(np.int32), cache_bytes(carry.caches))


def generate(model, tokens_BP, lengths_B=None, *, decode: Decode | None = None, padding: str = "right",
             on_tokens=None, chunk: int | None = None) -> Generation:
    """Decoder(model, decode)(tokens_BP, lengths_B, ...): see Decoder.__call__."""
    return Decoder(model, decode)(tokens_BP, lengths_B, padding=padding, on_tokens=on_tokens, chunk=chunk)


def sample(model, prompt: np.ndarray, *, max_new_tokens: int, temperature: float = 0.8,
           seed: int = 0, window: int | None = None) -> np.ndarray:
    """Extend int token array `prompt` [P] by `max_new_tokens` tokens; temperature 0 is greedy.

    The model sees the last `window` tokens (default: prompt + new tokens) left-aligned in a
    fixed buffer, so every step reuses one compiled forward.
    """
    if temperature < 0:
        raise ConfigError(f"temperature {temperature} must be >= 0")
    graphdef, params = nnx.split(model)
    W = window or (len(prompt) + max_new_tokens)

    @jax.jit
    def next_token(params, buf_1W, length, key):
        logits = nnx.merge(graphdef, params)(buf_1W)[0, length - 1]
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    tokens = [int(t) for t in prompt]
    key = jax.random.PRNGKey(seed)
    for i in range(max_new_tokens):
        ctx = tokens[-W:]
        buf = np.zeros((1, W), np.int32)
        buf[0, : len(ctx)] = ctx
        tok = next_token(params, jnp.asarray(buf), len(ctx), jax.random.fold_in(key, i))
        tokens.append(int(tok))
    return np.array(tokens[len(prompt):], np.int32)
