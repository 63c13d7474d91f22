"""Landmark attention's grouped softmax: the dense reference against the paper's definition
written out query by query in float64 numpy; the XLA gather path against the reference on the
same retrieved blocks, forward and gradients; retrieval against a brute-force top-k."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.errors import KernelInputError
from kernels.sparse_attention.landmark import landmark_reference, landmark_xla, retrieve
from kernels.sparse_attention.selection import Selection, tables_from_masks
from kernels.testing import assert_allclose


def _inputs(seed, b, t, h, g, d, block):
    rng = np.random.default_rng(seed)
    n = math.ceil(t / block)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return f(b, t, h, d), f(b, t, g, d), f(b, t, g, d), f(b, n, g, d)


def _definition(q, k, v, lk, block, live):
    """Sec. 3.1 query by query: the current group (keys j <= i of the query's block and the
    landmarks of the live earlier blocks) shares one softmax; a key of an earlier block gets its
    landmark's weight times its softmax within the block. float64 [B, T, H, D]."""
    b, t, h, d = q.shape
    r = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bb, i, hh in np.ndindex(b, t, h):
        c, gg = i // block, hh // r
        qi = q[bb, i, hh].astype(np.float64)
        sc = lambda x, qi=qi: float(np.dot(qi, x)) / math.sqrt(d)
        group = {("key", j): sc(k[bb, j, gg]) for j in range(c * block, i + 1)}
        group |= {("lm", m): sc(lk[bb, m, gg]) for m in range(c) if live[bb, hh, c, m]}
        zmax = max(group.values())
        z = sum(math.exp(x - zmax) for x in group.values())
        w = {key: math.exp(x - zmax) / z for key, x in group.items()}
        acc = np.zeros(d)
        for (kind, j), wj in w.items():
            if kind == "key":
                acc += wj * v[bb, j, gg]
            else:  # landmark m gates block m's keys, softmax within the block
                keys = range(j * block, min(t, (j + 1) * block))
                s = np.array([sc(k[bb, jj, gg]) for jj in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                acc += wj * sum(pj * v[bb, jj, gg] for pj, jj in zip(p, keys))
        out[bb, i, hh] = acc
    return out


def _selection(live, t, block):
    """A Selection listing the live earlier blocks (and the diagonal) of a [B, H, nQ, N] mask."""
    n = live.shape[-1]
    listed = live | np.eye(n, dtype=bool)
    kv, cnt, full = tables_from_masks(listed, np.zeros_like(listed))
    pos = np.arange(t, dtype=np.int32)[None]
    return Selection(kv_blocks=kv, counts=cnt, full_counts=full, q_positions=pos, k_positions=pos,
                     block_q=block, block_k=block)


@st.composite
def _cases(draw):
    t = draw(st.sampled_from([9, 16, 23]))
    block = draw(st.sampled_from([4, 8]))
    h, g = draw(st.sampled_from([(2, 1), (2, 2), (4, 2)]))
    return t, block, h, g, draw(st.integers(0, 2**16))


@settings(max_examples=4, deadline=None, derandomize=True)
@given(_cases())
def test_reference_is_the_grouped_softmax_definition(case):
    t, block, h, g, seed = case
    q, k, v, lk = _inputs(seed, 2, t, h, g, 4, block)
    n = math.ceil(t / block)
    live = np.random.default_rng(seed + 1).random((2, h, n, n)) < 0.5
    got = jax.jit(lambda *a: landmark_reference(*a, block=block, live=live))(q, k, v, lk)
    np.testing.assert_allclose(np.asarray(got), _definition(q, k, v, lk, block, live), rtol=2e-5, atol=2e-5)
    every = np.ones((1, 1, n, n), bool)  # training: every earlier block
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: landmark_reference(*a, block=block))(q, k, v, lk)),
                               _definition(q, k, v, lk, block, np.broadcast_to(every, (2, h, n, n))),
                               rtol=2e-5, atol=2e-5)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(_cases(), st.booleans())
def test_xla_path_equals_reference_forward_and_gradients(case, per_head):
    t, block, h, g, seed = case
    q, k, v, lk = _inputs(seed, 2, t, h, g, 8, block)
    n = math.ceil(t / block)
    live = np.random.default_rng(seed + 2).random((2, h if per_head else 1, n, n)) < 0.4
    sel = _selection(live, t, block)
    ref = jax.jit(lambda *a: landmark_reference(*a, block=block, live=live))
    xla = jax.jit(lambda *a: landmark_xla(*a, sel))
    assert_allclose(xla(q, k, v, lk), ref(q, k, v, lk), dtype=jnp.float32, contraction=t, scale=4)
    w = np.random.default_rng(seed + 3).normal(size=q.shape).astype(np.float32)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2, 3)))(q, k, v, lk)
    g_xla = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2, 3)))(q, k, v, lk)
    for name, a, e in zip(["q", "k", "v", "lk"], g_xla, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert_allclose(a, e, dtype=jnp.float32, contraction=t, scale=8, err_msg=name)


def test_xla_with_every_earlier_block_is_training_attention():
    t, block = 20, 4
    q, k, v, lk = _inputs(7, 1, t, 2, 1, 8, block)
    n = math.ceil(t / block)
    sel = _selection(np.ones((1, 1, n, n), bool) & ~np.eye(n, dtype=bool)[None, None], t, block)
    assert_allclose(jax.jit(lambda *a: landmark_xla(*a, sel))(q, k, v, lk),
                    jax.jit(lambda *a: landmark_reference(*a, block=block))(q, k, v, lk),
                    dtype=jnp.float32, contraction=t, scale=4)


def test_retrieve_picks_the_top_k_earlier_blocks_by_best_row_score():
    t, block, k_top = 30, 4, 2
    q, _, _, lk = _inputs(3, 2, t, 4, 2, 8, block)
    n = math.ceil(t / block)
    sel = retrieve(jnp.asarray(q), jnp.asarray(lk), block=block, k=k_top)
    kv, cnt = np.asarray(sel.kv_blocks), np.asarray(sel.counts)
    for bb, hh, i in np.ndindex(2, 4, n):
        rows = range(i * block, min(t, (i + 1) * block))
        score = [max(float(q[bb, r, hh] @ lk[bb, m, hh // 2]) for r in rows) for m in range(i)]
        want = set(np.argsort(score)[::-1][:k_top].tolist()) | {i}
        assert set(kv[bb, hh, i, : cnt[bb, hh, i]].tolist()) == want, (bb, hh, i)


def test_bad_landmark_shapes_are_refused():
    q, k, v, lk = _inputs(0, 1, 16, 2, 1, 4, 4)
    with pytest.raises(KernelInputError, match="one per block"):
        landmark_reference(q, k, v, lk[:, :3], block=4)
    with pytest.raises(KernelInputError, match="do not divide"):
        k2 = np.zeros((1, 16, 2, 4), np.float32)
        landmark_reference(np.zeros((1, 16, 3, 4), np.float32), k2, k2, np.zeros((1, 4, 2, 4), np.float32), block=4)
