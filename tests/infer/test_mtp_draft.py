"""Self-speculative decoding with the model's parallel MTP heads as the draft (horizon.infer.mtp_draft).

References: horizon's plain greedy decoder (Decoder / generate) for the tokens; the model's training
forward (model.trunk then model.mtp over the whole sequence, no cache) for the cached pass's logits and
for a brute-force replay of every round's draft and acceptance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import Decode, Objective
from horizon.errors import ConfigError
from horizon.infer import cache as kv
from horizon.infer.generate import generate, pad_prompts
from horizon.infer.mtp_draft import forward, init_caches, mtp_speculative_generate
from tests.infer._models import tiny_lm

DEPTH = 3


@functools.cache
def _mtp_lm():
    """tiny_lm with DEPTH parallel heads whose blocks' residual updates are shrunk 10x and whose norms
    take the final norm's scale: head d nearly repeats the main head's prediction, so its drafts hit
    on the greedy stream's repeats and rounds with n = 0, 0 < n < k and n = k all occur; the head
    blocks' attention still shifts their logits, so a wrong head cache shows."""
    model = tiny_lm(objective=Objective(mtp="parallel", mtp_depth=DEPTH))
    for block, norm in zip(model.mtp.blocks, model.mtp.norms):
        block.mixer.o.kernel[...] = block.mixer.o.kernel[...] * 0.1
        block.mlp.down.kernel[...] = block.mlp.down.kernel[...] * 0.1
        norm.scale[...] = model.final_norm.scale[...]
    return model


def _full_forward(model, seq_T, width: int = 40):
    """(main logits [T, V], head logits [DEPTH, T, V]) of the training forward on one sequence (run
    right-padded to `width`, which causal attention cannot see, so one compile serves every test)."""
    graphdef, state = nnx.split(model)
    x = np.zeros((1, width), np.int32)
    x[0, :len(seq_T)] = seq_T
    main, heads = _training_forward(graphdef, state, jnp.asarray(x))
    return np.asarray(main[0, :len(seq_T)]), np.stack([np.asarray(h[0, :len(seq_T)]) for h in heads])


@functools.partial(jax.jit, static_argnums=0)
def _training_forward(graphdef, state, x_1T):
    m = nnx.merge(graphdef, state)
    pos, seg = jnp.arange(x_1T.shape[1], dtype=jnp.int32)[None], jnp.zeros_like(x_1T)
    trunk = m.trunk(x_1T, positions_BT=pos, segment_ids_BT=seg)
    return m(x_1T, positions_BT=pos, segment_ids_BT=seg), m.mtp(m, trunk, x_1T, positions_BT=pos, segment_ids_BT=seg)


def _replay_rounds(model, prompt, greedy, k, max_new):
    """Accepted drafts per round, by an explicit loop over the greedy stream: with the last token at
    position L, draft j is head j's argmax at L - 1 (it predicts token L + j), kept while it equals
    the greedy token there; then L moves past the kept drafts and the next token."""
    seq = np.concatenate([prompt, greedy])
    heads_arg = _full_forward(model, seq)[1].argmax(-1)
    L, counts = len(prompt), []
    while L - len(prompt) + 1 < max_new:  # tokens emitted so far: positions len(prompt) .. L
        n = 0
        while n < k and heads_arg[n, L - 1] == seq[L + n + 1]:
            n += 1
        counts.append(n)
        L += n + 1
    return counts


def test_greedy_mtp_speculative_emits_the_greedy_tokens_and_counts_acceptances_exactly():
    model = _mtp_lm()
    prompts = [np.random.default_rng(3).integers(0, 32, n) for n in (20, 13)]
    toks, lens = pad_prompts(prompts)
    max_new = 16
    # the reference runs k tokens further so the replay can check every draft of the last round
    want = generate(model, toks, lens, decode=Decode(max_new_tokens=max_new + DEPTH)).tokens
    res = mtp_speculative_generate(model, toks, lens, decode=Decode(max_new_tokens=max_new))
    replayed = []
    for b in range(2):
        np.testing.assert_array_equal(res.tokens[b], want[b, :max_new])
        counts = _replay_rounds(model, prompts[b], want[b], DEPTH, max_new)
        np.testing.assert_array_equal(res.accepted[res.active[:, b], b], counts)
        replayed += counts
    replayed = np.array(replayed)
    # the model was built so the test covers full, partial and no acceptance
    assert (replayed == DEPTH).any() and ((replayed > 0) & (replayed < DEPTH)).any() and (replayed == 0).any()
    assert res.mean_accepted == pytest.approx(replayed.mean())
    np.testing.assert_allclose(res.acceptance_by_depth(), [(replayed >= j).mean() for j in range(1, DEPTH + 1)])
    forwards = [1 + res.active[:, b].sum() for b in range(2)]
    assert res.tokens_per_forward() == pytest.approx(np.mean([max_new / f for f in forwards]))
    print(f"MTP draft (k={DEPTH}): mean accepted {res.mean_accepted:.2f}, by depth {res.acceptance_by_depth()}, "
          f"{res.tokens_per_forward():.2f} tokens per target forward")


def test_cached_pass_with_rollback_matches_the_training_forward():
    """Main and head logits of `forward` over 5 prompt tokens, then a 5-token block cut back to 2 (a
    rejection), then 5 more tokens, equal the uncached training forward on the kept sequence."""
    model = _mtp_lm()
    seq = np.random.default_rng(1).integers(0, 32, 14).astype(np.int32)
    want_main, want_heads = _full_forward(model, seq)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, caches, x: forward(nnx.merge(graphdef, state), caches, x, DEPTH))
    caches = init_caches(model, DEPTH, batch=1, capacity=16)
    got_main, got_heads = [], []
    for lo, keep in ((0, 5), (5, 7), (7, 12)):
        fed = np.full(5, 5, np.int32)  # the cut-off columns feed junk: the rollback must discard it
        fed[:keep - lo] = seq[lo:keep]
        main, heads, caches = step(state, caches, jnp.asarray(fed)[None])
        caches = [kv.with_length(c, jnp.array([keep], jnp.int32)) for c in caches]
        got_main.append(np.asarray(main[0, :keep - lo]))
        got_heads.append(np.asarray(heads[0, :, :keep - lo]))
    np.testing.assert_allclose(np.concatenate(got_main), want_main[:12], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.concatenate(got_heads, axis=1), want_heads[:, :12], atol=1e-4, rtol=1e-4)


def _abstract_lm(**overrides):
    """tiny_lm's structure without its parameters (the checks read only the config)."""
    return nnx.eval_shape(lambda: tiny_lm(**overrides))


def test_a_model_without_parallel_mtp_heads_is_a_config_error():
    toks = np.zeros((1, 4), np.int32)
    with pytest.raises(ConfigError, match="has none"):
        mtp_speculative_generate(_abstract_lm(), toks)
    with pytest.raises(ConfigError, match="parallel heads"):
        mtp_speculative_generate(_abstract_lm(objective=Objective(mtp="sequential", mtp_depth=1)), toks)
    with pytest.raises(ConfigError, match="mtp_depth"):
        mtp_speculative_generate(_abstract_lm(objective=Objective(mtp="parallel", mtp_depth=DEPTH)), toks,
                                 k=DEPTH + 1)
    with pytest.raises(ConfigError, match="attention-only"):
        mtp_speculative_generate(_abstract_lm(layer_pattern="attn,ssd",
                                              objective=Objective(mtp="parallel", mtp_depth=1)), toks)

