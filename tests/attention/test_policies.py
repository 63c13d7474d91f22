"""Policies against their definitions by brute force: the allowed (query, key) pairs of each
Selection (block tables AND element masks, expanded densely) against the paper's rule written out
in numpy, exact block sets where the rule is geometric, EMA sinks and CCA core tokens against
sequential loops, HiP's tree search against the true top-k under attention locality, LongHeads'
chunk choice and position remap; the registry; traced and static builds agree."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon.attention import policies
from horizon.attention.policies.longgen import full_layers
from horizon.errors import ConfigError
from kernels.sparse_attention.reference import dense_mask

_B = 16  # block size used throughout


def _layout(t, cuts, b=2):
    """(positions [B, T], segment_ids [B, T]) numpy, documents starting at 0 and at each cut."""
    seg = np.searchsorted(np.asarray(cuts, int), np.arange(t), side="right").astype(np.int32)
    starts = np.concatenate([[0], np.asarray(cuts, int)])
    pos = (np.arange(t) - starts[seg]).astype(np.int32)
    return np.repeat(pos[None], b, 0), np.repeat(seg[None], b, 0)


_dense_mask = jax.jit(dense_mask, static_argnums=(1, 2))


def _mask(sel, t):
    """[Bs, Hs, T, S + E] numpy bool: every pair the Selection allows."""
    return np.asarray(_dense_mask(sel, t, t))


def _jit_policy(fn, *args, **kwargs):
    """fn(*args, **kwargs) under jit (one compile instead of many eager op compiles)."""
    return jax.jit(lambda *a: fn(*a, **kwargs))(*args)


def _rule(pos, seg, fn):
    """[B, T, T] bool: fn(pq, pk) over same-document pairs."""
    pq, pk = pos[:, :, None], pos[:, None, :]
    return (seg[:, :, None] == seg[:, None, :]) & fn(pq, pk)


@st.composite
def _layouts(draw):
    t = draw(st.sampled_from([70, 33, 100, 64]))
    cuts = sorted(set(draw(st.lists(st.integers(1, t - 1), max_size=3))))
    return t, cuts


_SET = settings(max_examples=3, deadline=None, derandomize=True)


@_SET
@given(_layouts(), st.sampled_from([1, 7, 16, 40]), st.sampled_from([0, 1, 5]))
def test_sliding_window_and_sinks_allow_exactly_their_defining_pairs(layout, window, n_sinks):
    t, cuts = layout
    pos, seg = _layout(t, cuts)
    for traced in (False, True):
        build = (
            (lambda fn, **kw: _jit_policy(fn, pos, seg, **kw))
            if traced
            else (lambda fn, **kw: fn(pos, seg, **kw))
        )
        sw = build(policies.sliding_window, window=window, block_q=_B, block_k=_B)
        want = _rule(pos, seg, lambda q, k: (q >= k) & (q - k < window))
        np.testing.assert_array_equal(_mask(sw, t)[:, 0], want)
        sk = build(policies.sinks, window=window, n_sinks=n_sinks, block_q=_B, block_k=_B)
        want = _rule(pos, seg, lambda q, k: (q >= k) & ((q - k < window) | (k < n_sinks)))
        np.testing.assert_array_equal(_mask(sk, t)[:, 0], want)
    dc = policies.dense_causal(pos, seg, block_q=_B, block_k=_B)
    np.testing.assert_array_equal(_mask(dc, t)[:, 0], _rule(pos, seg, lambda q, k: q >= k))


@pytest.mark.parametrize("t,window,bq,bk", [(100, 20, 16, 16), (77, 33, 32, 16), (64, 1, 16, 32)])
def test_sliding_window_selects_exactly_the_blocks_that_intersect_the_window(t, window, bq, bk):
    sel = policies.sliding_window(t, window=window, block_q=bq, block_k=bk)
    live = np.zeros((math.ceil(t / bq), math.ceil(t / bk)), bool)
    for i in range(t):
        for j in range(max(0, i - window + 1), i + 1):
            live[i // bq, j // bk] = True
    got = np.zeros_like(live)
    kvb, cnt = np.asarray(sel.kv_blocks)[0, 0], np.asarray(sel.counts)[0, 0]
    for i in range(live.shape[0]):
        got[i, kvb[i, : cnt[i]]] = True
    np.testing.assert_array_equal(got, live)
    # Static tables are tight: Kmax is the largest row.
    assert sel.kv_blocks.shape[-1] == live.sum(1).max()


@_SET
@given(_layouts(), st.sampled_from([1, 2, 3]), st.sampled_from([2, 3]))
def test_longgen_sparse_layers_follow_strided_local_sink_rule_and_middle_third_is_dense(
    layout, local, stride
):
    t, cuts = layout
    pos, seg = _layout(t, cuts)
    causal = _rule(pos, seg, lambda q, k: q >= k)
    n_layers = 6
    assert list(full_layers(n_layers)) == [2, 3]
    # Reachable key blocks of each query block: those holding a causal same-document pair.
    reach = {
        (b, qb): sorted(
            set((np.flatnonzero(causal[b, qb * _B : (qb + 1) * _B].any(0)) // _B).tolist())
        )
        for b in range(pos.shape[0])
        for qb in range(math.ceil(t / _B))
    }
    for layer in (0, 2, 5):  # bottom, middle (dense), top
        sel = _jit_policy(
            policies.longgen,
            pos,
            seg,
            layer=layer,
            n_layers=n_layers,
            stride=stride,
            local_blocks=local,
            sink_blocks=1,
            block_q=_B,
            block_k=_B,
        )
        got = _mask(sel, t)[:, 0]
        if layer in (2, 3):
            np.testing.assert_array_equal(got, causal)
            continue
        want = np.zeros_like(causal)
        for (b, qb), rb in reach.items():
            keep = set(rb[-local:]) | set(rb[:1]) | {j for j in rb if j % stride == stride - 1}
            rows = slice(qb * _B, (qb + 1) * _B)
            want[b, rows] = causal[b, rows] & np.isin(np.arange(t) // _B, sorted(keep))[None]
        np.testing.assert_array_equal(got, want)


def _ema_brute(k, pos, seg, first_row, window, n, alpha):
    """The EMA sink state of the block whose first row is `first_row`, by a token loop."""
    p0 = pos[first_row]
    lim = p0 - window + 1
    doc = np.flatnonzero(seg == seg[first_row])
    state = np.stack([k[doc[pos[doc] == j][0]] for j in range(n)]).astype(np.float64)
    for r in doc[np.argsort(pos[doc])]:
        if n <= pos[r] < lim:
            j = pos[r] % n
            state[j] = alpha * state[j] + (1 - alpha) * k[r]
    return state, lim > 0


@pytest.mark.parametrize("cuts,window,n", [([], 20, 4), ([40, 90], 16, 3), ([17], 33, 2)])
def test_ema_sink_rows_are_the_ema_of_evicted_tokens_and_seen_only_by_their_block(cuts, window, n):
    t, g, d, alpha = 120, 2, 8, 0.7
    pos, seg = _layout(t, cuts, b=1)
    k = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, t, g, d)))
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, t, g, d)))
    sel = _jit_policy(
        lambda p, s, k, v: policies.ema_sink(
            p, s, k_BSGD=k, v_BSGD=v, window=window, n_sinks=n, alpha=alpha, block_q=_B, block_k=_B
        ),
        pos,
        seg,
        k,
        v,
    )
    n_q = math.ceil(t / _B)
    ek, ev = np.asarray(sel.extra_k)[0], np.asarray(sel.extra_v)[0]
    mask = _mask(sel, t)[0, 0]
    for i in range(n_q):
        r0 = i * _B
        want_k, visible = _ema_brute(k[0], pos[0], seg[0], r0, window, n, alpha)
        want_v, _ = _ema_brute(v[0], pos[0], seg[0], r0, window, n, alpha)
        if visible:
            np.testing.assert_allclose(ek[i * n : (i + 1) * n], want_k, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ev[i * n : (i + 1) * n], want_v, rtol=1e-5, atol=1e-5)
        rows = np.arange(t)
        sees = (rows // _B == i) & (seg[0] == seg[0, r0]) & visible
        for j in range(n):
            np.testing.assert_array_equal(
                mask[:, t + i * n + j], sees, err_msg=f"block {i} slot {j}"
            )
    # Main keys: the window only, no raw sinks.
    np.testing.assert_array_equal(
        mask[:, :t], _rule(pos, seg, lambda q, k: (q >= k) & (q - k < window))[0]
    )


def test_cca_core_tokens_pool_each_group_by_its_last_query_and_open_after_the_group():
    t, h, g, d, group, window = 50, 4, 2, 8, 8, 12
    pos, seg = _layout(t, [21], b=1)
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(ks[0], (1, t, h, d))
    k = jax.random.normal(ks[1], (1, t, g, d))
    v = jax.random.normal(ks[2], (1, t, g, d))
    sel = _jit_policy(
        lambda p, s, q, k, v: policies.cca(
            p, s, q_BTHD=q, k_BSGD=k, v_BSGD=v, group=group, window=window, block_q=_B, block_k=_B
        ),
        pos,
        seg,
        q,
        k,
        v,
    )
    qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    mask = _mask(sel, t)[0, 0]
    for c in range(math.ceil(t / group)):
        last = min((c + 1) * group, t) - 1
        rows = [r for r in range(c * group, last + 1) if seg[0, r] == seg[0, last]]
        for gg in range(g):
            qbar = qn[last, gg * (h // g) : (gg + 1) * (h // g)].mean(0)
            logit = np.array([qbar @ kn[r, gg] for r in rows]) / math.sqrt(d)
            w = np.exp(logit - logit.max())
            w /= w.sum()
            np.testing.assert_allclose(
                np.asarray(sel.extra_k)[0, c, gg], w @ kn[rows, gg], rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                np.asarray(sel.extra_v)[0, c, gg], w @ vn[rows, gg], rtol=1e-5, atol=1e-5
            )
        sees = (seg[0] == seg[0, last]) & (pos[0] > pos[0, last])
        np.testing.assert_array_equal(mask[:, t + c], sees)
    np.testing.assert_array_equal(
        mask[:, :t], _rule(pos, seg, lambda q, k: (q >= k) & (q - k < window))[0]
    )


def _chosen(sel, b, h, i):
    """Live key blocks of query block i (batch b, head h)."""
    kvb, cnt = np.asarray(sel.kv_blocks), np.asarray(sel.counts)
    hs = min(h, kvb.shape[1] - 1)
    return set(kvb[b, hs, i, : cnt[b, hs, i]].tolist())


@pytest.mark.parametrize("peak", [11.3, 23.6, 40.2, 52.8])
def test_hip_finds_the_true_top_k_blocks_under_attention_locality(peak):
    # Key block scores fall off smoothly from a peak (HiP's attention-locality assumption).
    t, h, d, budget = 64 * _B, 2, 16, 6
    u = np.zeros(d, np.float32)
    u[0] = 1.0
    blk = np.arange(t) // _B
    amp = np.exp(-0.5 * ((blk - peak) / 4.0) ** 2).astype(np.float32)
    noise = 1e-3 * np.asarray(jax.random.normal(jax.random.PRNGKey(int(peak * 10)), (1, t, 1, d)))
    k = jnp.asarray(amp[None, :, None, None] * u + noise)
    q = jnp.asarray(np.broadcast_to(u, (1, t, h, d)).copy())
    sel = _jit_policy(
        lambda q, k: policies.hip(
            t,
            q_BTHD=q,
            k_BSGD=k,
            budget=budget,
            local_blocks=1,
            sink_blocks=1,
            block_q=_B,
            block_k=_B,
        ),
        q,
        k,
    )
    kbar = np.asarray(k)[0, :, 0].reshape(-1, _B, d).mean(1)
    for i in (63, 58):
        cand = np.arange(1, i)  # not the sink block 0, not the local block i
        true_top = cand[np.argsort(-(kbar[cand] @ u), kind="stable")[:budget]]
        for hh in range(h):
            chosen = _chosen(sel, 0, hh, i)
            assert set(true_top.tolist()) <= chosen, (i, hh, sorted(true_top), sorted(chosen))
            assert {0, i} <= chosen and len(chosen) == budget + 2


def test_hip_with_a_budget_covering_every_block_is_dense_causal():
    t, d = 80, 16
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    q, k = jax.random.normal(ks[0], (1, t, 2, d)), jax.random.normal(ks[1], (1, t, 1, d))
    sel = _jit_policy(
        lambda q, k: policies.hip(t, q_BTHD=q, k_BSGD=k, budget=8, block_q=_B, block_k=_B), q, k
    )
    causal = np.tril(np.ones((t, t), bool))
    for h in range(2):
        np.testing.assert_array_equal(_mask(sel, t)[0, h], causal)


def test_longheads_picks_top_scored_chunks_within_trained_length_and_remaps_positions():
    t, h, g, d, trained, local = 128, 4, 2, 8, 48, 1
    ks = jax.random.split(jax.random.PRNGKey(5), 2)
    q = jax.random.normal(ks[0], (1, t, h, d))
    k = jax.random.normal(ks[1], (1, t, g, d))
    inv = jnp.asarray(1.0 / 10000 ** (np.arange(0, d, 2) / d), jnp.float32)
    sel = _jit_policy(
        lambda q, k, inv: policies.longheads(
            t,
            q_BTHD=q,
            k_BSGD=k,
            trained_length=trained,
            local_blocks=local,
            block_q=_B,
            block_k=_B,
            rope_inv_freq=inv,
        ),
        q,
        k,
        inv,
    )
    budget = trained // _B - 1 - local
    qbar = np.asarray(q)[0].reshape(-1, _B, h, d).mean(1)  # [nQ, H, D]
    kbar = np.asarray(k)[0].reshape(-1, _B, g, d).mean(1)
    mask = _mask(sel, t)[0]
    kvb, cnt, shift = (np.asarray(x)[0] for x in (sel.kv_blocks, sel.counts, sel.kv_shift))
    for hh in range(h):
        # At most trained_length keys per query.
        assert mask[hh].sum(1).max() <= trained
        for i in range(t // _B):
            forced = {0, i}
            cand = [j for j in range(i) if j not in forced]
            scores = np.array([qbar[i, hh] @ kbar[j, hh // (h // g)] for j in cand])
            top = {cand[x] for x in np.argsort(-scores, kind="stable")[:budget]}
            assert _chosen(sel, 0, hh, i) == top | forced
            # Remap: chosen far blocks sit side by side just before the local block.
            far = sorted(b for b in top | forced if b != i)
            for slot in range(cnt[hh, i]):
                bl = kvb[hh, i, slot]
                want = 0 if bl == i else (i - len(far) + far.index(bl) - bl) * _B
                assert shift[hh, i, slot] == want
            dist = (i * _B + np.arange(_B))[:, None] - (np.arange(t)[None, :] + 0)
            dist_remapped = (
                dist
                - np.array(
                    [
                        shift[hh, i, list(kvb[hh, i, : cnt[hh, i]]).index(j // _B)]
                        if j // _B in far
                        else 0
                        for j in range(t)
                    ]
                )[None, :]
            )
            live = mask[hh, i * _B : (i + 1) * _B]
            assert dist_remapped[live].max(initial=0) < trained + _B


def test_sinks_remap_keeps_rope_distances_near_the_window():
    t, window, n, d = 200, 32, 4, 8
    inv = np.asarray(1.0 / 10000 ** (np.arange(0, d, 2) / d), np.float32)
    sel = policies.sinks(t, window=window, n_sinks=n, block_q=_B, block_k=_B, rope_inv_freq=inv)
    kvb, cnt, shift = (np.asarray(x)[0, 0] for x in (sel.kv_blocks, sel.counts, sel.kv_shift))
    mask = _mask(sel, t)[0, 0]
    for i in range(math.ceil(t / _B)):
        sh = np.zeros(math.ceil(t / _B), int)
        sh[kvb[i, : cnt[i]]] = shift[i, : cnt[i]]
        rows = np.arange(i * _B, min((i + 1) * _B, t))
        dist = rows[:, None] - (np.arange(t) + sh[np.arange(t) // _B])[None, :]
        live = mask[rows]
        assert dist[live].min() >= 0 and dist[live].max() < window + _B


def test_registry_builds_by_name_and_drops_context_arguments_a_policy_does_not_take():
    assert set(policies.POLICIES) == {
        "dense_causal",
        "sliding_window",
        "sinks",
        "ema_sink",
        "longgen",
        "longheads",
        "hip",
        "cca",
    }
    q = jnp.zeros((1, 32, 2, 8))
    k = jnp.zeros((1, 32, 1, 8))
    sel = policies.build(
        "sliding_window",
        32,
        None,
        window=8,
        block_q=_B,
        block_k=_B,
        q_BTHD=q,
        k_BSGD=k,
        v_BSGD=k,
        layer=3,
        n_layers=6,
    )
    ref = policies.sliding_window(32, window=8, block_q=_B, block_k=_B)
    np.testing.assert_array_equal(np.asarray(sel.kv_blocks), np.asarray(ref.kv_blocks))
    assert policies.get("hip") is policies.hip
    with pytest.raises(ConfigError, match="unknown"):
        policies.get("nope")
    with pytest.raises(ConfigError, match="takes no argument"):
        policies.build("sliding_window", 32, window=8, stride=2)
    with pytest.raises(ConfigError, match="window"):
        policies.sliding_window(32, window=0)


def test_policies_built_under_jit_match_their_static_builds():
    t = 90
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    for name, kw in [
        ("sinks", {"window": 20, "n_sinks": 2}),
        ("longgen", {"layer": 0, "n_layers": 3}),
    ]:
        static = _mask(policies.get(name)(t, block_q=_B, block_k=_B, **kw), t)
        fn = policies.get(name)
        traced = jax.jit(
            lambda p, fn=fn, kw=kw: dense_mask(fn(p, block_q=_B, block_k=_B, **kw), t, t)
        )(pos)
        np.testing.assert_array_equal(np.asarray(traced), static, err_msg=name)
