"""A tiny LM config and prompts shared by the decoding tests, and the greedy-vs-full-forward check."""

import numpy as np

from horizon.config import SSM, Decode, Model
from horizon.eval.harness import argmax_fn
from horizon.infer.generate import Decoder, pad_prompts

BASE = Model(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3,  # peaky: no ties
             ssm=SSM(state_size=8, head_dim=16, chunk=8))
PROMPTS = [np.random.default_rng(0).integers(0, 32, n) for n in (5, 9, 3)]


def _full_argmax(model, prompts, generated):
    """The full forward's argmax at the positions that predicted each generated token (one batch:
    rows right-padded, which causal attention and the SSM cannot see)."""
    rows = [np.concatenate([p, g]).astype(np.int32) for p, g in zip(prompts, generated)]
    buf, _ = pad_prompts(rows)
    ids = argmax_fn(model)(buf)
    return [ids[b, len(p) - 1:len(r) - 1] for b, (p, r) in enumerate(zip(prompts, rows))]


def _check_greedy(model, decoder=None):
    toks, lens = pad_prompts(PROMPTS)
    decoder = decoder or Decoder(model, Decode(max_new_tokens=6))
    g = decoder(toks, lens)
    assert g.tokens.shape == (3, 6) and list(g.lengths) == [6, 6, 6]
    for want, row in zip(_full_argmax(model, PROMPTS, g.tokens), g.tokens):
        np.testing.assert_array_equal(want, row)
    return g


def tiny_lm(**overrides):
    """LM(BASE with overrides), seed 0."""
    import dataclasses

    from flax import nnx

    from horizon.models.lm import LM

    cfg = dataclasses.replace(BASE, **overrides)
    return LM(cfg, rngs=nnx.Rngs(0))
