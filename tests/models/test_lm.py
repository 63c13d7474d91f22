"""The decoder LM: causality, document masking, jit vs no-jit, grouped-query attention vs a
hand-written reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.attention.attend import attend
from horizon.config import SSM, Attention, Model
from horizon.models.heads import token_cross_entropy
from horizon.models.lm import LM

CFG = Model(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)


def _model(cfg=CFG):
    return LM(cfg, rngs=nnx.Rngs(0))


class CausalityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_loss_at_t_ignores_tokens_after_t(self):
        graphdef, params = nnx.split(_model())
        T, t = 16, 7

        def per_token_loss(params, tokens):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1])
            return token_cross_entropy(logits, tokens[:, 1:])

        f = self.variant(per_token_loss)
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T + 1), 0, 64)
        changed = tokens.at[:, t + 2:].set((tokens[:, t + 2:] + 17) % 64)
        a, b = f(params, tokens), f(params, changed)
        np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
        assert not np.allclose(np.asarray(a[:, t + 2:]), np.asarray(b[:, t + 2:]))

    def test_gradient_of_loss_at_t_wrt_later_embeddings_is_zero(self):
        model = _model()
        graphdef, params = nnx.split(model)
        T, t = 12, 5
        tokens = jax.random.randint(jax.random.PRNGKey(2), (1, T), 0, 64)

        def loss_t(x_BTM):
            m = nnx.merge(graphdef, params)
            x = x_BTM
            pos = jnp.arange(T)[None]
            seg = jnp.zeros((1, T), jnp.int32)
            for blk in m.layers:
                x = blk(x, positions_BT=pos, segment_ids_BT=seg)
            return m.logits(m.final_norm(x))[0, t].sum()

        emb = model.embed(tokens)
        g = jax.grad(loss_t)(emb)
        assert np.all(np.asarray(g[0, t + 1:]) == 0.0)
        assert np.any(np.asarray(g[0, : t + 1]) != 0.0)


class JitTest(chex.TestCase):
    def test_jit_and_eager_forward_agree(self):
        model = _model()
        tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 64)
        eager = model(tokens)
        graphdef, params = nnx.split(model)
        jitted = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, tokens)
        np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


def _reference_attention(q, k, v, seg):
    """Plain numpy grouped-query causal attention restricted to each document."""
    B, T, H, D = q.shape
    G = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            s = q[b, :, h] @ k[b, :, g].T / np.sqrt(D)
            mask = np.tril(np.ones((T, T), bool)) & (seg[b][:, None] == seg[b][None, :])
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


def test_attend_matches_numpy_reference_with_documents():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 10, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 10, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 10, 2, 8)).astype(np.float32)
    seg = np.array([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3], np.int32)
    pos = np.concatenate([np.arange(4), np.arange(6)])[None].repeat(2, 0)
    pos[1] = np.concatenate([np.arange(7), np.arange(3)])
    for impl in ("xla", "reference"):
        out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), positions_BT=jnp.asarray(pos),
                     segment_ids_BT=jnp.asarray(seg), cfg=Attention(block=4, implementation=impl))
        np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_attend_dense_equals_jax_dot_product_attention():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 24, 4, 8)).astype(np.float32) for _ in range(3))
    pos = np.arange(24)[None].repeat(2, 0)
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), positions_BT=jnp.asarray(pos),
                 segment_ids_BT=jnp.zeros((2, 24), jnp.int32), cfg=Attention(block=8))
    expected = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)




def test_documents_do_not_see_each_other():
    """Changing document 0 leaves the logits of document 1 (same window) exactly unchanged."""
    model = _model()
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 16), 0, 64)
    seg = jnp.array([[0] * 6 + [1] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    a = model(tokens, positions_BT=pos, segment_ids_BT=seg)
    b = model(tokens.at[0, :6].set((tokens[0, :6] + 5) % 64), positions_BT=pos, segment_ids_BT=seg)
    np.testing.assert_array_equal(np.asarray(a[0, 6:]), np.asarray(b[0, 6:]))
    # and a document starting mid-window equals the same document alone at positions 0..
    alone = model(tokens[:, 6:])
    np.testing.assert_allclose(np.asarray(a[0, 6:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


class HybridCausalityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_hybrid_ssd_attention_model_is_causal(self):
        cfg = Model(d_model=32, n_layers=3, n_heads=4, vocab_size=64, layer_pattern="ssd,ssd,attn",
                    ssm=SSM(state_size=8, head_dim=8, chunk=4))
        model = LM(cfg, rngs=nnx.Rngs(0))
        assert [b.mixer_name for b in model.layers] == ["ssd", "ssd", "attn"]
        graphdef, params = nnx.split(model)
        T, t = 13, 6

        def per_token_loss(params, tokens):
            return token_cross_entropy(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])

        f = self.variant(per_token_loss)
        tokens = jax.random.randint(jax.random.PRNGKey(5), (2, T + 1), 0, 64)
        changed = tokens.at[:, t + 2:].set((tokens[:, t + 2:] + 11) % 64)
        a, b = f(params, tokens), f(params, changed)
        np.testing.assert_array_equal(np.asarray(a[:, : t + 1]), np.asarray(b[:, : t + 1]))
        assert not np.allclose(np.asarray(a[:, t + 2:]), np.asarray(b[:, t + 2:]))
