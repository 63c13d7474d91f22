"""Mamba-2 under context parallelism, on 8 simulated CPU devices: with a `context` mesh axis > 1 the
mixer's scan runs through horizon.ssm.context_parallel (a shard_map, checked in the jaxpr) and the
mixer, its gradients, a cached prefill, LongMamba and a hybrid LM give what the same module gives
with no mesh, with packed documents whose boundaries fall on, next to and across shard edges. The
causal conv (computed on the global array, halo by GSPMD) is checked against a brute-force loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import SSM, Mesh, Model
from horizon.errors import ShapeError
from horizon.models.lm import LM
from horizon.ssm import longmamba
from horizon.ssm.ssd import Mamba2, _segment_resets, causal_conv
from horizon.train.loop import batch_sharding
from horizon.train.sharding import make_mesh
from kernels.testing import assert_allclose

_CFG = Model(d_model=32, n_heads=4, n_layers=2, vocab_size=64,
             ssm=SSM(state_size=16, head_dim=8, n_groups=2, chunk=4, conv_width=4))
Bz, T = 2, 32


def _segments():
    """Row 0: ids reused (A B A pattern), a 2-token document starting on the shard edge 16 (context
    2 and 4), one starting 1 token after edge 24; row 1: documents starting exactly on edges 8 and
    24 (context 4), a 1-token document at 8, one document crossing 16."""
    seg = np.zeros((Bz, T), np.int32)
    seg[0, 5:16], seg[0, 16:18], seg[0, 18:25], seg[0, 25:] = 1, 0, 1, 2
    seg[1, 8:9], seg[1, 9:24], seg[1, 24:] = 1, 2, 3
    return jnp.asarray(seg)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _primitives(jaxpr, out=None):
    """Names of every primitive in a jaxpr and its sub-jaxprs."""
    out = set() if out is None else out
    for e in jaxpr.eqns:
        out.add(e.primitive.name)
        for v in e.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _primitives(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _primitives(sub, out)
    return out


def _loss_and_grads(module, fn, *args):
    """(output, grads of sum(output * w) w.r.t. the module's params), jitted over the split state."""
    graphdef, state = nnx.split(module)
    out_shape = jax.eval_shape(lambda s, *a: fn(nnx.merge(graphdef, s), *a), state, *args)
    w = _x(out_shape.shape, 99)

    def loss(s, *a):
        y = fn(nnx.merge(graphdef, s), *a)
        return (y * w).sum(), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y), grads = run(state, *args)
    return y, grads, jax.make_jaxpr(loss)(state, *args)


def _assert_grads_match(got, want, contraction):
    for (path, g), (_, r) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
        r = r.get_value()
        mag = float(jnp.max(jnp.abs(r))) + 1e-6  # relative to the gradient's size
        assert_allclose(g.get_value() / mag, r / mag, dtype=jnp.float32, contraction=contraction, scale=4,
                        err_msg=str(path))


@pytest.fixture(scope="module")
def mixer():
    return Mamba2(_CFG, layer_index=0, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def unsharded(mixer):
    """The reference: output, param grads and jaxpr of the same mixer with no mesh."""
    return _loss_and_grads(mixer, _call, _x((Bz, T, 32)), _segments())


def _call(m, x, seg):
    return m(x, segment_ids_BT=seg)


@pytest.mark.parametrize("mesh", [Mesh(data=2, context=4), Mesh(data=2, tensor=2, context=2)])
def test_mixer_on_a_context_mesh_matches_the_unsharded_mixer_and_its_param_grads(mixer, unsharded, mesh):
    y_ref, g_ref, jaxpr_ref = unsharded
    with jax.set_mesh(make_mesh(mesh)):
        # Inputs made under the mesh arrive committed and replicated: the conv's shifts once
        # mis-partitioned exactly there (lax.pad with a negative pad), so keep this placement.
        y, g, jaxpr = _loss_and_grads(mixer, _call, _x((Bz, T, 32)), _segments())
    # The context-parallel scan ran (a shard_map chaining chunk states), and only under the mesh.
    assert {"shard_map", "all_gather"} <= _primitives(jaxpr.jaxpr)
    assert "shard_map" not in _primitives(jaxpr_ref.jaxpr)
    assert_allclose(y, y_ref, dtype=jnp.float32, contraction=T * 16)
    _assert_grads_match(g, g_ref, contraction=T * 16)


def test_cached_prefill_with_longmamba_on_a_context_mesh_matches_the_unsharded_mixer(mixer):
    # A cache from an earlier piece flows into the first document (conv window and SSM state), and
    # LongMamba's dt filter (calibrated at 8 tokens, applied at 8 + 32) runs before the shard_map.
    x0, x, seg = _x((Bz, 8, 32), 1), _x((Bz, T, 32), 2), _segments()
    dt_BTH = mixer._dt(mixer._project(x0)[-1])  # the dt a calibration at 8 tokens would see
    lm = longmamba.layer_stats(dt_BTH, mixer.A_H(), global_decay=1e-6)  # every head global
    graphdef, state = nnx.split(mixer)
    _, cache = jax.jit(lambda s, x: nnx.merge(graphdef, s).prefill(x))(state, x0)

    def run(state, x, seg, cache, lm):
        return nnx.merge(graphdef, state).prefill(x, segment_ids_BT=seg, cache=cache, longmamba=lm)

    dt_x = mixer._dt(mixer._project(x)[-1])
    assert 0.2 < float(jnp.mean(longmamba.filter_dt(dt_x, lm, length=8 + T) == 0)) < 1  # the filter acts here
    yr, cr = jax.jit(lambda *a: run(*a, lm))(state, x, seg, cache)
    with jax.set_mesh(make_mesh(Mesh(data=2, context=4))):
        y, c = jax.jit(lambda *a: run(*a, lm))(state, x, seg, cache)
    assert_allclose(y, yr, dtype=jnp.float32, contraction=T * 16)
    for name in ("conv_x", "conv_B", "conv_C", "ssm"):
        assert_allclose(getattr(c, name), getattr(cr, name), dtype=jnp.float32, contraction=T * 16, err_msg=name)


def test_hybrid_lm_forward_on_a_context_mesh_matches_the_unsharded_lm():
    # SSM and ring-attention layers under one mesh. Documents numbered by run (as data.batches
    # packs them) with positions restarting at each: attention masks by id equality.
    cfg = Model(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=64, layer_pattern="ssd,attn",
                ssm=_CFG.ssm)
    graphdef, state = nnx.split(LM(cfg, rngs=nnx.Rngs(1)))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (Bz, T)), jnp.int32)
    seg = np.asarray(_segments())
    change = np.concatenate([np.ones((Bz, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    doc = np.cumsum(change, axis=1)
    pos = np.arange(T) - np.maximum.accumulate(np.where(change, np.arange(T), 0), axis=1)
    fwd = lambda s, t, p, d: nnx.merge(graphdef, s)(t, positions_BT=p, segment_ids_BT=d)
    args = (state, tokens, jnp.asarray(pos, jnp.int32), jnp.asarray(doc, jnp.int32))
    ref = jax.jit(fwd)(*args)
    mesh = make_mesh(Mesh(data=2, context=4))
    with jax.set_mesh(mesh):
        # The batch placed as the train loop places it: [batch, length] over (data, context).
        sharded = (state, *(jax.device_put(a, batch_sharding(mesh)) for a in args[1:]))
        got = jax.jit(fwd)(*sharded)
        assert "shard_map" in _primitives(jax.make_jaxpr(fwd)(*sharded).jaxpr)
    assert_allclose(got, ref, dtype=jnp.float32, contraction=T * 32, scale=2)


def _conv_by_definition(u, w, b, seg, state):
    """out_t = b + sum_j w[j] x_{t-(W-1)+j} over x = [state, u], keeping the terms of t's document
    (documents are runs of equal ids; the state belongs to the first); the next state is the last
    W-1 entries of x, those of earlier documents zeroed. Plain loops over numpy arrays."""
    W, Tn = w.shape[0], u.shape[1]
    x = np.concatenate([state, u], axis=1)
    doc = np.concatenate([np.zeros((u.shape[0], W - 1), int),
                          np.cumsum(np.diff(seg, prepend=seg[:, :1]) != 0, axis=1)], axis=1)
    out = np.zeros_like(u)
    for r in range(u.shape[0]):
        for t in range(Tn):
            out[r, t] = b + sum(w[j] * x[r, t + j] for j in range(W) if doc[r, t + j] == doc[r, t + W - 1])
    return out, np.where((doc[:, Tn:] == doc[:, -1:])[..., None], x[:, Tn:], 0.0)


@pytest.mark.parametrize("seg", [
    [[0, 0, 1, 1, 1, 1, 0, 2, 2, 2, 2], [5] * 6 + [6] * 5],  # ids reused, a 1-token-apart start
    [[0, 1], [5, 5]],  # fewer tokens than the window: the next state keeps part of the old one
])
def test_causal_conv_matches_its_definition_with_documents_and_a_state(seg):
    rng = np.random.default_rng(4)
    seg = np.asarray(seg, np.int32)
    (Bn, Tn), W, C = seg.shape, 4, 3
    u, w, b, state = (rng.standard_normal(s).astype(np.float32) for s in ((Bn, Tn, C), (W, C), (C,), (Bn, W - 1, C)))
    out, nxt = jax.jit(lambda u, w, b, seg, state: causal_conv(u, w, b, _segment_resets(seg), state))(
        u, w, b, seg, state)
    want, want_state = _conv_by_definition(u, w, b, seg, state)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nxt, want_state, rtol=0, atol=0)


def test_context_size_must_divide_the_sequence(mixer):
    with jax.set_mesh(make_mesh(Mesh(data=2, context=4))), pytest.raises(ShapeError, match="multiple"):
        mixer(_x((Bz, 30, 32)))
