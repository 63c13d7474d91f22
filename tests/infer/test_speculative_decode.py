"""Greedy speculative decoding (temperature 0: one-hot distributions, so the acceptance rule keeps
a draft token exactly when it is the target's argmax) emits exactly the target's greedy tokens; the
draft is the same model under a window + sinks cache. Prints the mean accepted length."""

import numpy as np

from horizon.config import Decode
from horizon.infer.generate import generate, pad_prompts
from horizon.infer.speculative import speculative_generate
from tests.infer._models import tiny_lm


def test_greedy_speculative_decoding_emits_the_target_greedy_tokens():
    model = tiny_lm()
    prompts = [np.random.default_rng(2).integers(0, 32, n) for n in (20, 13)]
    toks, lens = pad_prompts(prompts)
    want = generate(model, toks, lens, decode=Decode(max_new_tokens=10)).tokens
    res = speculative_generate(model, toks, lens, decode=Decode(max_new_tokens=10), draft_cache_size=10,
                               n_sinks=2, k=3)
    for b in range(2):
        np.testing.assert_array_equal(res.tokens[b], want[b])
    assert 0.0 <= res.mean_accepted <= 3.0
    print(f"mean accepted draft tokens per round (k=3, draft window 8 + 2 sinks): {res.mean_accepted:.2f}")


