"""attention_flop_fraction against a brute-force count: the causal block pairs enumerated element
by element in numpy, the live pairs counted as the distinct blocks listed per row, and for
sliding windows the closed geometric rule (blocks intersecting the window) with no Selection at
all; dense causal spends exactly 1."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon.attention import policies
from horizon.attention.selection import attention_flop_fraction
from horizon.errors import ShapeError
from kernels.sparse_attention.selection import Selection

_B = 16


def _layout(t, cuts):
    """(positions [1, T], segment_ids [1, T]) numpy: documents starting at 0 and at each cut."""
    seg = np.searchsorted(np.asarray(cuts, int), np.arange(t), side="right").astype(np.int32)
    starts = np.concatenate([[0], np.asarray(cuts, int)])
    return (np.arange(t) - starts[seg]).astype(np.int32)[None], seg[None]


def _causal_pairs(pos, seg, bq, bk):
    """Block pairs holding a same-document (query, key) pair with the key not after the query."""
    t = pos.shape[1]
    n = 0
    for i in range(math.ceil(t / bq)):
        for j in range(math.ceil(t / bk)):
            q = slice(i * bq, min(t, (i + 1) * bq))
            k = slice(j * bk, min(t, (j + 1) * bk))
            pairs = (seg[0, q, None] == seg[0, None, k]) & (pos[0, q, None] >= pos[0, None, k])
            n += bool(pairs.any())
    return n


def _listed_pairs(sel):
    """[Bs, Hs] number of distinct live blocks over all rows, read off the tables one by one."""
    kvb, cnt = np.asarray(sel.kv_blocks), np.asarray(sel.counts)
    out = np.zeros(cnt.shape[:2])
    for b, h, i in np.ndindex(cnt.shape):
        out[b, h] += len(set(kvb[b, h, i, : cnt[b, h, i]].tolist()))
    return out


@st.composite
def _layouts(draw):
    t = draw(st.sampled_from([64, 70, 100]))
    cuts = sorted(set(draw(st.lists(st.integers(1, t - 1), max_size=2))))
    return t, cuts


@settings(max_examples=3, deadline=None, derandomize=True)
@given(_layouts())
def test_fraction_is_listed_pairs_over_brute_force_causal_pairs(layout):
    t, cuts = layout
    pos, seg = _layout(t, cuts)
    causal = _causal_pairs(pos, seg, _B, _B)
    rng = np.random.default_rng(t)
    q = jax.numpy.asarray(rng.normal(size=(2, t, 4, 8)), jax.numpy.float32)
    k = jax.numpy.asarray(rng.normal(size=(2, t, 2, 8)), jax.numpy.float32)
    builders = {
        "dense_causal": lambda q, k: policies.dense_causal(pos, seg, block_q=_B, block_k=_B),
        "sinks": lambda q, k: policies.sinks(pos, seg, window=20, n_sinks=4, block_q=_B, block_k=_B),
        "hip": lambda q, k: policies.hip(pos, seg, q_BTHD=q, k_BSGD=k, budget=1, block_q=_B, block_k=_B),
        "cca": lambda q, k: policies.cca(pos, seg, q_BTHD=q, k_BSGD=k, v_BSGD=k, group=8, block_q=_B, block_k=_B),
    }
    for name, fn in builders.items():
        # One compile per policy: the Selection and its fraction under jit (traced queries, keys).
        sel, got = jax.jit(lambda q, k, fn=fn: (s := fn(q, k), attention_flop_fraction(s)))(q, k)
        want = (_listed_pairs(sel) / causal).mean()
        assert float(got) == pytest.approx(want, rel=1e-6), name
        if name == "dense_causal":
            assert float(got) == pytest.approx(1.0)


@pytest.mark.parametrize("t,window,bq,bk", [(128, 32, 16, 16), (100, 20, 16, 16), (96, 40, 16, 32)])
def test_sliding_window_fraction_matches_the_geometric_count(t, window, bq, bk):
    # Numerator from the rule alone: block (i, j) is live iff some query p in block i has a key
    # in [p - window + 1, p] inside block j. Denominator: the same with window = infinity.
    def blocks(w):
        live = set()
        for p in range(t):
            for j in range(max(0, p - w + 1), p + 1):
                live.add((p // bq, j // bk))
        return len(live)

    sel = policies.sliding_window(t, window=window, block_q=bq, block_k=bk)
    assert float(attention_flop_fraction(sel)) == pytest.approx(blocks(window) / blocks(t), rel=1e-6)
    traced = jax.jit(lambda p: attention_flop_fraction(
        policies.sliding_window(p, window=window, block_q=bq, block_k=bk)))(np.arange(t, dtype=np.int32)[None])
    assert float(traced) == pytest.approx(blocks(window) / blocks(t), rel=1e-6)


def test_cross_attention_selection_is_refused():
    sel = Selection(kv_blocks=np.zeros((1, 1, 1, 1), np.int32), counts=np.ones((1, 1, 1), np.int32),
                    q_positions=np.zeros((1, 4), np.int32), k_positions=np.zeros((1, 8), np.int32),
                    block_q=4, block_k=4)
    with pytest.raises(ShapeError, match="self-attention"):
        attention_flop_fraction(sel)
