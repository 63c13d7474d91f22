"""Context-parallel SSD on 8 simulated CPU devices: the sequence sharded over the context axis, chunk
states passed between shards, gives the outputs, final state and gradients of one single-device
kernels.ssd.ssd call (sequential reference), with documents crossing and starting at shard edges
and an initial state; a context size that does not divide T is one ShapeError."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.attention import ring
from horizon.config import Mesh
from horizon.errors import ShapeError
from horizon.ssm.context_parallel import context_parallel_ssd
from horizon.train.sharding import make_mesh
from kernels.ssd import ssd

Bz, T, H, P, G, N = 2, 32, 4, 4, 2, 8


def _inputs():
    ks = jax.random.split(jax.random.PRNGKey(0), 7)
    x = jax.random.normal(ks[0], (Bz, T, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (Bz, T, H))) * 0.3
    A = -jnp.exp(jax.random.normal(ks[2], (H,)) * 0.5)
    B = jax.random.normal(ks[3], (Bz, T, G, N))
    C = jax.random.normal(ks[4], (Bz, T, G, N))
    D = jax.random.normal(ks[5], (H,))
    h0 = jax.random.normal(ks[6], (Bz, H, P, N))
    seg = np.zeros((Bz, T), np.int32)
    seg[0, 13:] = 1  # a document crossing a shard boundary
    seg[1, 8:] = 1  # one starting exactly at a shard boundary (contiguous, 8 shards)
    seg[1, 24:] = 2
    return (x, dt, A, B, C), D, h0, jnp.asarray(seg)


@pytest.mark.parametrize("mesh, layout", [
    (Mesh(data=1, context=8), "contiguous"),
    (Mesh(data=2, tensor=2, context=2), "zigzag"),
])
def test_matches_single_device_ssd_outputs_state_and_gradients(mesh, layout):
    args, D, h0, seg = _inputs()
    jmesh = make_mesh(mesh)
    n = jmesh.shape["context"]
    wy = jax.random.normal(jax.random.PRNGKey(5), (Bz, T, H, P))
    wh = jax.random.normal(jax.random.PRNGKey(6), (Bz, H, P, N))

    def loss_cp(x, dt, A, B, C, h0):
        to = lambda a: ring.to_layout(a, n, layout)  # noqa: E731
        y, h = context_parallel_ssd(to(x), to(dt), A, to(B), to(C), D_H=D, segment_ids_BT=to(seg),
                                    initial_state_BHPN=h0, layout=layout, chunk=4)
        y = ring.from_layout(y, n, layout)
        return (y * wy).sum() + (h * wh).sum(), (y, h)

    def loss_ref(x, dt, A, B, C, h0):
        y, h = ssd(x, dt, A, B, C, D=D, segment_ids=seg, initial_state=h0, implementation="reference")
        return (y * wy).sum() + (h * wh).sum(), (y, h)

    with jax.set_mesh(jmesh):
        (_, (y, h)), g = jax.jit(jax.value_and_grad(loss_cp, argnums=range(6), has_aux=True))(*args, h0)
    (_, (yr, hr)), gr = jax.jit(jax.value_and_grad(loss_ref, argnums=range(6), has_aux=True))(*args, h0)
    np.testing.assert_allclose(y, yr, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, hr, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), g, gr):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_context_size_must_divide_the_sequence():
    (x, dt, A, B, C), _, _, seg = _inputs()
    cut = lambda a: a[:, :28]  # noqa: E731
    with jax.set_mesh(make_mesh(Mesh(data=1, context=8))), pytest.raises(ShapeError, match="multiple"):
        context_parallel_ssd(cut(x), cut(dt), A, cut(B), cut(C), segment_ids_BT=cut(seg))
