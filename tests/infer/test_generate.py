"""Cached decoding against the model's own full forward (no cache): greedy tokens are the full
forward's argmax at every step (ragged batches, either padding side); stop tokens stop a row; a
streaming cache decodes past its size at constant bytes; bad input is one clear HorizonError each.
Hybrid stacks: test_generate_hybrid.py; logits: test_decode_logits.py; speculative: test_speculative_decode.py."""


import jax.numpy as jnp
import numpy as np
import pytest

from horizon.config import Decode
from horizon.errors import ConfigError, ShapeError
from horizon.infer import step as steps
from horizon.infer.generate import Decoder, generate, pad_prompts
from tests.infer._models import PROMPTS, _check_greedy, tiny_lm


def test_cached_greedy_decode_is_the_full_forward_argmax_at_every_step():
    model = tiny_lm()
    decoder = Decoder(model, Decode(max_new_tokens=6))
    g = _check_greedy(model, decoder)
    left, lens = pad_prompts(PROMPTS, padding="left")
    g_left = decoder(left, lens, padding="left", chunk=4)  # same shapes: no recompilation
    np.testing.assert_array_equal(g_left.tokens, g.tokens)


def test_a_stop_token_stops_its_row_only():
    model = tiny_lm()
    toks, lens = pad_prompts(PROMPTS)
    free = generate(model, toks, lens, decode=Decode(max_new_tokens=5)).tokens
    stop = int(free[0, 1])
    g = generate(model, toks, lens, decode=Decode(max_new_tokens=5, stop_tokens=(stop,)))
    for b in range(3):
        hits = np.flatnonzero(free[b] == stop)
        n = hits[0] + 1 if len(hits) else 5
        assert g.lengths[b] == n
        np.testing.assert_array_equal(g.tokens[b, :n], free[b, :n])
        assert np.all(g.tokens[b, n:] == -1)


# ---------------------------------------------------------------------------------------- bad input


def test_a_prompt_longer_than_the_full_cache_is_one_clear_error():
    model = tiny_lm()
    with pytest.raises(ConfigError, match="--cache streaming"):
        generate(model, np.zeros((1, 20), np.int32), decode=Decode(cache_size=16, max_new_tokens=4))


def test_caches_built_for_another_model_are_one_clear_error():
    model = tiny_lm()
    other = tiny_lm(n_kv_heads=4)
    with pytest.raises(ShapeError, match="another model config"):
        steps.extend(model, steps.init_caches(other, Decode(), batch=1, capacity=8), jnp.zeros((1, 2), jnp.int32))
    deeper = tiny_lm(n_layers=3)
    with pytest.raises(ShapeError, match="3 layers"):
        steps.check_caches(deeper, steps.init_caches(model, Decode(), batch=1, capacity=8))
    hybrid = tiny_lm(layer_pattern="attn,ssd")
    with pytest.raises(ShapeError, match="Mamba-2"):
        steps.check_caches(hybrid, steps.init_caches(model, Decode(), batch=1, capacity=8))


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.5, "decode.temperature"), ("top_p", 0.0, "decode.top_p"), ("top_p", 1.5, "decode.top_p"),
    ("max_new_tokens", 0, "decode.max_new_tokens"), ("cache", "ring", "decode.cache"),
])
def test_sampling_parameters_out_of_range_are_one_clear_error(field, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        Decode(**{field: value})
    assert "\n" not in str(e.value)


def test_streaming_cache_needs_a_size_and_no_selector():
    with pytest.raises(ConfigError, match="decode.cache_size"):
        Decode(cache="streaming")
    with pytest.raises(ConfigError, match="decode.policy"):
        Decode(cache="streaming", cache_size=16, policy="tokenselect")


def test_a_streaming_cache_decodes_past_its_size():
    model = tiny_lm()
    toks = np.random.default_rng(3).integers(0, 32, (2, 12)).astype(np.int32)
    dec = Decoder(model, Decode(cache="streaming", cache_size=6, n_sinks=2, max_new_tokens=8))
    g = dec(toks)
    assert g.tokens.shape == (2, 8) and np.all(g.tokens >= 0)
    # constant-size: 2 layers x (k + v) x [2, 6, 2, 8] fp32 + lengths
    assert g.cache_bytes == 2 * (2 * 2 * 6 * 2 * 8 * 4 + 2 * 4)


def test_the_decoder_gives_depth_dependent_selectors_the_model_depth():
    model = tiny_lm()
    sel = Decoder(model, Decode(policy="tidaldecode", options="budget=8")).selector
    assert sel.n_layers == model.cfg.n_layers
    assert Decoder(model, Decode(policy="tidaldecode", options="n_layers=7")).selector.n_layers == 7
