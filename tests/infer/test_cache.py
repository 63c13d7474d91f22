"""KV caches against brute-force definitions: the window + sinks ring's attention (keep the first
n_sinks and last window tokens, rotate keys at their cache positions, dense softmax) and the
EMA-sink cache's (window plus EMA rows of the evicted tokens), over steps past the capacity, through
the real decode attention step; a prompt fill equals token-by-token appends; paged summaries;
reported bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import Model
from horizon.infer import cache as kv
from horizon.infer.selectors import get_selector
from horizon.infer.step import _attn_step
from horizon.models.blocks import AttentionMixer

CFG = Model(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.5)
B, G, D, H = 2, 1, 8, 2


def _rope_np(x_TGD, pos_T, theta=10_000.0):
    """Rotate-half RoPE in numpy (RoFormer eq. 34), the spec the tests compare against."""
    half = x_TGD.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(0, 2 * half, 2) / (2 * half))
    ang = pos_T[:, None, None] * inv
    x1, x2 = x_TGD[..., :half], x_TGD[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def _dense(q_HD, k_SGD, v_SGD, wo):
    """softmax(q k / sqrt(D)) v over the given keys, heads grouped onto kv heads, then W_o."""
    r = H // G
    out = []
    for h in range(H):
        logits = k_SGD[:, h // r] @ q_HD[h] / np.sqrt(D)
        p = np.exp(logits - logits.max())
        out.append((p / p.sum()) @ v_SGD[:, h // r])
    return np.concatenate(out) @ wo


def _run_steps(mixer, cache, x_TBM):
    sel = get_selector("full")
    graphdef, state = nnx.split(mixer)

    @jax.jit
    def run(state, cache, x_TBM):
        m = nnx.merge(graphdef, state)

        def body(c, x):
            y, c, _, _ = _attn_step(m, x, c, sel, (), (), 0)
            return c, y

        return jax.lax.scan(body, cache, x_TBM)

    return run(state, cache, x_TBM)


def _weights(mixer):
    return (np.asarray(mixer.q.kernel[...]), np.asarray(mixer.k.kernel[...]), np.asarray(mixer.v.kernel[...]),
            np.asarray(mixer.o.kernel[...]))


@pytest.fixture(scope="module")
def mixer():
    m = AttentionMixer(CFG, layer_index=0, rngs=nnx.Rngs(1))
    assert hasattr(m.q, "kernel")
    return m


def test_streaming_attention_equals_sinks_plus_window_rerotated_at_cache_positions(mixer):
    n, w, T = 2, 4, 11  # capacity 6, 5 steps past it
    x = np.random.default_rng(0).normal(size=(T, B, CFG.d_model)).astype(np.float32)
    cache = kv.init_cache("streaming", batch=B, capacity=n + w, kv_heads=G, head_dim=D, n_sinks=n)
    _, y = _run_steps(mixer, cache, jnp.asarray(x))
    wq, wk, wv, wo = _weights(mixer)
    for b in range(B):
        for t in range(T):
            keep = sorted(set(range(min(n, t + 1))) | set(range(max(0, t + 1 - w), t + 1)))
            xs = x[keep, b]
            k = _rope_np((xs @ wk).reshape(-1, G, D), np.arange(len(keep)))
            v = (xs @ wv).reshape(-1, G, D)
            q = _rope_np((x[t, b] @ wq).reshape(1, H, D), np.array([len(keep) - 1]))[0]
            np.testing.assert_allclose(np.asarray(y[t, b]), _dense(q, k, v, wo), rtol=2e-5, atol=2e-6)


def test_ema_sink_attention_equals_its_definition(mixer):
    n, w, T, a = 2, 4, 13, 0.7
    x = np.random.default_rng(1).normal(size=(T, B, CFG.d_model)).astype(np.float32)
    cache = kv.init_cache("ema_sink", batch=B, capacity=n + w, kv_heads=G, head_dim=D, n_sinks=n, alpha=a)
    _, y = _run_steps(mixer, cache, jnp.asarray(x))
    wq, wk, wv, wo = _weights(mixer)
    for b in range(B):
        k_all = _rope_np((x[:, b] @ wk).reshape(T, G, D), np.arange(T))  # after RoPE, absolute positions
        v_all = (x[:, b] @ wv).reshape(T, G, D)
        for p in range(T):
            lo = max(0, p - w + 1)
            ks, vs = [k_all[lo:p + 1]], [v_all[lo:p + 1]]
            if lo > 0:  # sink j: token j, then S <- a S + (1 - a) x for evicted t >= n, t = j mod n
                for j in range(n):
                    sk, sv = k_all[j].copy(), v_all[j].copy()
                    for t in range(n, lo):
                        if t % n == j:
                            sk, sv = a * sk + (1 - a) * k_all[t], a * sv + (1 - a) * v_all[t]
                    ks.append(sk[None])
                    vs.append(sv[None])
            q = _rope_np((x[p, b] @ wq).reshape(1, H, D), np.array([p]))[0]
            want = _dense(q, np.concatenate(ks), np.concatenate(vs), wo)
            np.testing.assert_allclose(np.asarray(y[p, b]), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["streaming", "ema_sink", "full", "paged"])
def test_prompt_fill_equals_token_by_token_appends(kind):
    rng = np.random.default_rng(2)
    P, cap = 13, 16 if kind in ("full", "paged") else 7
    k = jnp.asarray(rng.normal(size=(B, P, G, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, P, G, D)), jnp.float32)
    lengths = jnp.asarray([P, 9], jnp.int32)
    empty = kv.init_cache(kind, batch=B, capacity=cap, kv_heads=G, head_dim=D, n_sinks=2, page_size=4, alpha=0.6)
    filled = kv.fill(empty, k, v, lengths)
    for b in range(B):
        one = jax.tree.map(lambda x, b=b: x[b:b + 1], empty)
        for t in range(int(lengths[b])):
            one = kv.append(one, k[b:b + 1, t], v[b:b + 1, t])
        for got, want in zip(jax.tree.leaves(filled), jax.tree.leaves(one)):
            np.testing.assert_allclose(np.asarray(got[b:b + 1]), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_paged_summaries_equal_brute_force():
    rng = np.random.default_rng(3)
    ps, S = 4, 16
    c = kv.init_cache("paged", batch=B, capacity=S - 2, kv_heads=G, head_dim=D, page_size=ps)  # rounds up to 16
    assert kv.capacity(c) == S
    lengths = [11, 4]
    k = rng.normal(size=(B, S, G, D)).astype(np.float32)
    c = kv.fill(c, jnp.asarray(k), jnp.asarray(k), jnp.asarray(lengths, jnp.int32))
    for b, L in enumerate(lengths):
        for p in range(S // ps):
            rows = [k[b, s] for s in range(p * ps, (p + 1) * ps) if s < L]
            if rows:
                np.testing.assert_allclose(c.k_mean[b, p], np.mean(rows, 0), rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(c.k_min[b, p], np.min(rows, 0))
                np.testing.assert_array_equal(c.k_max[b, p], np.max(rows, 0))
            else:
                assert np.all(np.isinf(c.k_min[b, p])) and np.all(c.k_mean[b, p] == 0)


@pytest.mark.parametrize("kind", ["full", "streaming", "ema_sink", "paged"])
def test_cache_bytes_are_the_sum_of_leaf_nbytes(kind):
    c = kv.init_cache(kind, batch=3, capacity=8, kv_heads=2, head_dim=4, dtype=jnp.bfloat16, n_sinks=2, page_size=4)
    want = 2 * 3 * 8 * 2 * 4 * 2 + 3 * 4  # k and v in bf16, lengths int32
    if kind == "paged":
        want += 3 * (3 * 2 * 2 * 4 * 4)  # mean, min, max per page in fp32
    assert kv.cache_bytes(c) == want == sum(x.nbytes for x in jax.tree.leaves(c))


@pytest.mark.parametrize("kind", ["full", "paged"])
def test_append_many_equals_token_by_token_appends(kind):
    rng = np.random.default_rng(3)
    T, cap = 5, 16
    start = kv.fill(kv.init_cache(kind, batch=B, capacity=cap, kv_heads=G, head_dim=D, page_size=4),
                    jnp.asarray(rng.normal(size=(B, 6, G, D)), jnp.float32),
                    jnp.asarray(rng.normal(size=(B, 6, G, D)), jnp.float32), jnp.asarray([6, 3], jnp.int32))
    k = jnp.asarray(rng.normal(size=(B, T, G, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, G, D)), jnp.float32)
    many = kv.append_many(start, k, v)
    one = start
    for t in range(T):
        one = kv.append(one, k[:, t], v[:, t])
    for got, want in zip(jax.tree.leaves(many), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
