"""Document masking end to end: the attention weight from a token to any token of another document
is exactly zero, and the loss is a per-token average over weighted targets (each token counts once,
whatever the length of its document)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from horizon.attention.attend import attend
from horizon.config import Attention
from horizon.models.heads import next_token_loss


def test_attention_weight_across_documents_is_exactly_zero():
    # With v = identity over key positions (D = S), the output row of query t IS its weight row.
    B, T, H, G = 2, 8, 4, 2
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, H, T)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, G, T)), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(T, dtype=jnp.float32)[None, :, None, :], (B, T, G, T))
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 2, 2]], jnp.int32)
    s = np.asarray(seg)
    pos = np.stack([np.arange(T) - np.searchsorted(row, row) for row in s]).astype(np.int32)  # per-document
    w_BTHS = np.asarray(attend(q, k, v, positions_BT=jnp.asarray(pos), segment_ids_BT=seg, cfg=Attention(block=4)))
    allowed_BTS = (s[:, :, None] == s[:, None, :]) & np.tril(np.ones((T, T), bool))[None]
    forbidden = np.broadcast_to(~allowed_BTS[:, :, None, :], w_BTHS.shape)
    assert np.all(w_BTHS[forbidden] == 0.0)  # exactly zero, not small
    np.testing.assert_allclose(w_BTHS.sum(-1), 1.0, rtol=1e-5)
    assert np.all(w_BTHS[np.broadcast_to(allowed_BTS[:, :, None, :], w_BTHS.shape)] > 0)


def test_loss_is_a_per_token_average_over_weighted_targets():
    # Two documents in one window: 3 targets of doc 0, the boundary target (weight 0), 2 of doc 1.
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.25, 0.75]]]))
    targets = jnp.array([[0, 0, 1, 0, 1, 0]])
    weights = jnp.array([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    by_hand = -(math.log(0.5) + math.log(0.9) + math.log(0.8) + math.log(0.7) + math.log(0.25)) / 5
    assert abs(float(next_token_loss(logits, targets, weights)) - by_hand) < 1e-6
    per_doc_mean = -((math.log(0.5) + math.log(0.9) + math.log(0.8)) / 3 + (math.log(0.7) + math.log(0.25)) / 2) / 2
    assert abs(by_hand - per_doc_mean) > 1e-3  # the two averages differ here, so the test can tell


def test_gradient_across_documents_is_exactly_zero_in_the_model():
    from flax import nnx

    from horizon.config import Model
    from horizon.models.lm import LM

    model = LM(Model(d_model=32, n_layers=2, n_heads=2, vocab_size=64), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 0, 64)
    seg = jnp.array([[0] * 4 + [1] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])

    def doc1_logits(x_BTM):
        m = nnx.merge(graphdef, params)
        for blk in m.layers:
            x_BTM = blk(x_BTM, positions_BT=pos, segment_ids_BT=seg)
        return m.logits(m.final_norm(x_BTM))[0, 4:].sum()

    g = np.asarray(jax.grad(doc1_logits)(model.embed(tokens)))
    assert np.all(g[0, :4] == 0.0) and np.any(g[0, 4:] != 0.0)
