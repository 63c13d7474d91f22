"""Ring attention on 8 simulated CPU devices: outputs and gradients equal single-device dense
attention (document + causal masks, grouped-query heads) for the ring and all-gather variants,
contiguous and zig-zag layouts; dead blocks of a block table are skipped, not computed; a
Selection's block set and window drive it; zig-zag balances causal work; bad shapes are errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.attention import ring
from horizon.config import Mesh
from horizon.errors import ShapeError
from horizon.train.sharding import make_mesh

B, T, H, G, D = 2, 32, 4, 2, 8


def _inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, G, D))
    v = jax.random.normal(ks[2], (B, T, G, D))
    seg = np.zeros((B, T), np.int32)
    seg[0, 11:] = 1  # a document boundary inside a shard
    seg[1, 16:] = 1  # and one exactly at a shard boundary
    return q, k, v, jnp.asarray(seg)


@jax.jit
def _dense(q, k, v, allowed_BTS):
    """Plain softmax attention over an explicit [B, T, S] mask; rows with no key give 0."""
    kk = jnp.repeat(k, H // G, axis=2)
    vv = jnp.repeat(v, H // G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(D)
    s = jnp.where(allowed_BTS[:, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(jnp.where(allowed_BTS[:, None], s, -1e30), -1, keepdims=True))
    p = jnp.where(allowed_BTS[:, None], p, 0.0)
    den = p.sum(-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", p / jnp.where(den > 0, den, 1.0), vv)


def _doc_causal(seg):
    i = jnp.arange(T)
    return (i[None, :, None] >= i[None, None, :]) & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("mesh, layout, variant", [
    (Mesh(data=1, context=8), "contiguous", "ring"),
    (Mesh(data=2, context=4), "zigzag", "ring"),
    (Mesh(data=1, tensor=2, context=4), "zigzag", "allgather"),
])
def test_outputs_and_gradients_equal_single_device_attention(mesh, layout, variant):
    q, k, v, seg = _inputs()
    jmesh = make_mesh(mesh)
    n = jmesh.shape["context"]
    w = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, D))  # a generic cotangent

    def ring_loss(q, k, v):
        to = lambda a: ring.to_layout(a, n, layout)  # noqa: E731
        out = ring.context_parallel_attention(to(q), to(k), to(v), segment_ids_BT=to(seg), layout=layout,
                                              variant=variant)
        out = ring.from_layout(out, n, layout)
        return (out * w).sum(), out

    with jax.set_mesh(jmesh):
        (_, out), grads = jax.jit(jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    def dense_loss(q, k, v):
        out = _dense(q, k, v, _doc_causal(seg))
        return (out * w).sum(), out

    (_, want), want_g = jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out, jax.jit(jax.nn.dot_product_attention, static_argnames="implementation")(
        q, k, v, mask=_doc_causal(seg)[:, None], implementation="xla"), atol=2e-5, rtol=1e-5)
    for g, wg in zip(grads, want_g):
        np.testing.assert_allclose(g, wg, atol=5e-5, rtol=1e-4)


def test_dead_blocks_are_skipped_and_a_selection_drives_the_ring():
    from kernels.sparse_attention.selection import Selection, tables_from_masks

    q, k, v, seg = _inputs(1)
    bs = 4  # T / (4 shards x 2 chunks): a block is exactly one skippable chunk
    rng = np.random.default_rng(0)
    live = np.tril(rng.random((T // bs, T // bs)) < 0.7) | np.eye(T // bs, dtype=bool)
    live[:, 5] = False  # nobody reads key block 5 ...
    v_nan = v.at[:, 5 * bs:6 * bs].set(jnp.nan)  # ... so NaN there shows whether it was computed
    tok = np.arange(T) // bs
    allowed = _doc_causal(seg) & jnp.asarray(live[tok][:, tok])[None]
    want = _dense(q, k, v, allowed)

    kv_blocks, counts, _ = tables_from_masks(live[None, None], np.zeros_like(live)[None, None])
    sel = Selection(kv_blocks=kv_blocks, counts=counts, q_positions=np.arange(T)[None],
                    k_positions=np.arange(T)[None], block_q=bs, block_k=bs, causal=True)
    with jax.set_mesh(make_mesh(Mesh(data=1, context=4), jax.devices()[:4])):
        f = jax.jit(lambda q, k, v, s, t: ring.context_parallel_attention(
            q, k, v, segment_ids_BT=s, block_live=t, block_q=bs, block_k=bs))
        got = f(q, k, v_nan, seg, jnp.asarray(live))
        got_sel = jax.jit(lambda q, k, v, s: ring.context_parallel_attention(q, k, v, segment_ids_BT=s,
                                                                            block_live=sel))(q, k, v_nan, seg)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got_sel, want, atol=2e-5, rtol=1e-5)


def test_selection_window_and_sinks_apply_elementwise():
    from kernels.sparse_attention.selection import Selection

    q, k, v, seg = _inputs(2)
    window, sinks, bs = 6, 2, 8
    nb = T // bs
    live = np.tril(np.ones((nb, nb), bool))
    sel = Selection(kv_blocks=np.tile(np.arange(nb, dtype=np.int32), (1, 1, nb, 1)),
                    counts=np.arange(1, nb + 1, dtype=np.int32)[None, None], q_positions=np.arange(T)[None],
                    k_positions=np.arange(T)[None], block_q=bs, block_k=bs, causal=True, window=window,
                    sink_tokens=sinks)
    assert live.sum() == sel.counts.sum()
    i = jnp.arange(T)
    allowed = _doc_causal(seg) & (((i[:, None] - i[None, :]) < window) | (i[None, :] < sinks))[None]
    with jax.set_mesh(make_mesh(Mesh(data=1, context=2), jax.devices()[:2])):
        got = jax.jit(lambda q, k, v, s: ring.context_parallel_attention(
            q, k, v, segment_ids_BT=s, block_live=sel, layout="zigzag"))(
            *[ring.to_layout(a, 2, "zigzag") for a in (q, k, v, seg)])
    np.testing.assert_allclose(ring.from_layout(got, 2, "zigzag"), _dense(q, k, v, allowed), atol=2e-5, rtol=1e-5)


def _live_pairs(layout, n, steps_T=64):
    """[n devices, n ring steps] number of live (query chunk, key chunk) pairs under a causal mask,
    by the same liveness rule the ring uses."""
    pos = ring.layout_indices(steps_T, n, layout).reshape(n, 2, -1)  # [device, chunk, token]
    seg = np.zeros_like(pos[0, 0])[None]
    out = np.zeros((n, n), int)
    for d in range(n):
        for s in range(n):
            src = (d - s) % n
            for qc in pos[d]:
                for kc in pos[src]:
                    m = ring._pair_mask(jnp.asarray(qc)[None], jnp.asarray(kc)[None], seg, seg, None, causal=True,
                                        window=None, sink_tokens=0, block_q=1, block_k=1)
                    out[d, s] += bool(m.any())
    return out


def test_zigzag_gives_every_device_the_same_causal_work_each_step():
    zz = _live_pairs("zigzag", 4)
    assert (zz == zz[0]).all(), zz  # identical per step across devices
    assert zz.sum() == (2 * 4) * (2 * 4 + 1) // 2  # exactly the causal chunk pairs, none wasted
    cont = _live_pairs("contiguous", 4)
    assert cont.sum() == zz.sum() and cont.sum(1).max() > 2 * cont.sum(1).min()  # same work, unbalanced


def test_context_size_must_divide_the_sequence():
    q, k, v, seg = _inputs()
    with jax.set_mesh(make_mesh(Mesh(data=1, context=8))):
        with pytest.raises(ShapeError, match="multiple"):
            ring.context_parallel_attention(q[:, :28], k[:, :28], v[:, :28], segment_ids_BT=seg[:, :28])
        with pytest.raises(ShapeError, match="zig-zag"):
            ring.context_parallel_attention(q[:, :24], k[:, :24], v[:, :24], segment_ids_BT=seg[:, :24],
                                            layout="zigzag")
