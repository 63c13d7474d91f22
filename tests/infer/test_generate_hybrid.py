"""Cached greedy decoding of a hybrid stack (attention + SSD: a KV cache and a Mamba-2 recurrent state)
is the full forward's argmax at every step, over a ragged batch."""

from tests.infer._models import _check_greedy, tiny_lm


def test_hybrid_cached_greedy_decode_is_the_full_forward_argmax_at_every_step():
    _check_greedy(tiny_lm(layer_pattern="attn,ssd"))
