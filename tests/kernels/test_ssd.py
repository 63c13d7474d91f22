"""kernels.ssd: the chunked XLA path and the Pallas kernel (interpret mode) against the sequential
scan, forward and gradients; streaming with a carried state; segment resets; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from kernels.errors import KernelInputError
from kernels.ssd import resolve_implementation, ssd, ssd_reference
from kernels.ssd.xla import pass_states, ssd_xla
from kernels.testing import assert_allclose


def _inputs(seed, batch, T, H, P, G, N, *, dtype=jnp.float32):
    # numpy draws: eager jax.random would compile a threefry program per shape (seconds each).
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    x = jnp.asarray(normal(batch, T, H, P), dtype)
    dt = jnp.asarray(np.log1p(np.exp(normal(batch, T, H) - 1.0)))  # softplus: positive steps
    A = jnp.asarray(-np.exp(rng.uniform(-1.0, 1.5, H)).astype(np.float32))
    B = jnp.asarray(normal(batch, T, G, N), dtype)
    C = jnp.asarray(normal(batch, T, G, N), dtype)
    D = jnp.asarray(normal(H))
    h0 = jnp.asarray(normal(batch, H, P, N))
    return x, dt, A, B, C, D, h0


def _segments(layout: str, batch: int, T: int):
    """Segment ids: none, one document, random cuts (ids may repeat non-adjacently), or one per token."""
    if layout == "none":
        return None
    if layout == "single":
        return jnp.full((batch, T), 7, jnp.int32)
    if layout == "every_token":
        return jnp.tile(jnp.arange(T, dtype=jnp.int32), (batch, 1))
    rng = np.random.default_rng(T * 31 + batch)
    return jnp.asarray(rng.integers(0, 2, size=(batch, T)).cumsum(axis=1) % 3, jnp.int32)


def _ref(x, dt, A, B, C, D, h0, seg):
    return ssd_reference(x, dt, A, B, C, D, h0, seg)


def _value_and_grads(fn, n_diff):
    """One jitted function per implementation: (y, final state) and the loss gradients."""
    def f(args, seg):
        def loss(*diff):
            y, h = fn(*diff, *args[len(diff):], seg)
            w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
            # Weights every output and the final state differently, so gradients see both.
            return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(h * jnp.cos(h)), (y, h)
        (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(n_diff)), has_aux=True)(*args[:n_diff])
        return out, grads
    return jax.jit(f)


def _check_against_reference(fn, args, seg, *, grad_scale=4.0):
    """Forward and gradients of fn against the sequential scan; h0=None: no initial state."""
    x, B, h0 = args[0], args[3], args[6]
    T, N = x.shape[1], B.shape[-1]
    n_diff = 6 if h0 is None else 7  # the reference's grad w.r.t. a None state does not exist
    (y_ref, h_ref), g_ref = _value_and_grads(_ref, n_diff)(args, seg)
    (y, h), g = _value_and_grads(fn, n_diff)(args, seg)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert_allclose(y, y_ref, dtype=jnp.float32, contraction=T * N, err_msg="y")
    assert_allclose(h, h_ref, dtype=jnp.float32, contraction=T, err_msg="final state")
    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    for name, a, b in zip(names, g, g_ref):
        scale = float(jnp.max(jnp.abs(b))) + 1.0
        assert_allclose(a / scale, b / scale, dtype=jnp.float32, contraction=T * N, scale=grad_scale,
                        err_msg=f"grad {name}")


# No shrinking: each example compiles new shapes, and a shrink would take minutes on 2 cores.
@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(
    chunk=st.sampled_from([3, 8, 16]),
    T=st.integers(1, 40),
    groups_heads=st.sampled_from([(1, 1), (1, 3), (2, 4), (4, 4)]),
    layout=st.sampled_from(["none", "single", "random", "every_token"]),
    with_state=st.booleans(),
)
def test_xla_chunked_equals_sequential_scan_forward_and_grads(chunk, T, groups_heads, layout, with_state):
    G, H = groups_heads
    x, dt, A, B, C, D, h0 = _inputs(T + chunk, 2, T, H, 4, G, 8)
    h0 = h0 if with_state else None
    seg = _segments(layout, 2, T)

    def fn(x, dt, A, B, C, D, h0, seg):
        return ssd(x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg, chunk=chunk,
                   implementation="xla")

    _check_against_reference(fn, (x, dt, A, B, C, D, h0), seg)


def test_xla_blocked_loop_equals_sequential_scan_forward_and_grads():
    # The CPU path runs blocks of chunks under lax.scan; here blocks of 2 chunks of 4 tokens, with
    # document boundaries both inside and on block edges, and an initial state.
    args = _inputs(4, 2, 37, 2, 4, 1, 8)
    seg = jnp.asarray([[0] * 8 + [1] * 13 + [2] * 16, [3] * 30 + [4] * 7], jnp.int32)

    def fn(x, dt, A, B, C, D, h0, seg):
        return ssd_xla(x, dt, A, B, C, D, h0, seg, chunk=4, block_chunks=2)

    _check_against_reference(fn, args, seg)


def test_xla_chunk_of_one_token_equals_sequential_scan():
    args = _inputs(1, 1, 9, 2, 4, 1, 8)
    seg = _segments("random", 1, 9)
    y_ref, h_ref = jax.jit(ssd_reference)(*args, seg)
    y, h = ssd(*args[:5], D=args[5], initial_state=args[6], segment_ids=seg, chunk=1, implementation="xla")
    assert_allclose(y, y_ref, dtype=jnp.float32, contraction=9 * 8)
    assert_allclose(h, h_ref, dtype=jnp.float32, contraction=9)


def test_pallas_kernel_equals_sequential_scan_forward_and_grads():
    # T not a multiple of the chunk, two groups of two heads, documents, an initial state.
    args = _inputs(7, 1, 37, 4, 8, 2, 16)
    seg = _segments("random", 1, 37)

    def fn(x, dt, A, B, C, D, h0, seg):
        return ssd(x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg, chunk=16,
                   implementation="pallas", interpret=True)

    _check_against_reference(fn, args, seg)


@pytest.mark.parametrize("T,P,N,layout", [(32, 16, 32, "none"), (20, 12, 20, "every_token")])
def test_pallas_kernel_forward_equals_sequential_scan(T, P, N, layout):
    # One whole chunk without segments; P and N that are not powers of two (padded inside).
    x, dt, A, B, C, D, h0 = _inputs(T, 1, T, 2, P, 1, N)
    seg = _segments(layout, 1, T)
    fn = jax.jit(lambda *a: ssd(*a[:5], D=a[5], initial_state=a[6], segment_ids=a[7],
                                chunk=T if T == 32 else 16, implementation="pallas", interpret=True))
    y, h = fn(x, dt, A, B, C, D, h0, seg)
    y_ref, h_ref = jax.jit(ssd_reference)(x, dt, A, B, C, D, h0, seg)
    assert_allclose(y, y_ref, dtype=jnp.float32, contraction=T * N)
    assert_allclose(h, h_ref, dtype=jnp.float32, contraction=T)


def test_parallel_and_sequential_state_passing_agree():
    rng = np.random.default_rng(2)
    decay = jnp.asarray(rng.uniform(size=(2, 13, 3)), jnp.float32)
    states = jnp.asarray(rng.standard_normal((2, 13, 3, 4, 5)), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
    (prev_p, fin_p), (prev_s, fin_s) = (
        jax.jit(pass_states, static_argnames="parallel")(decay[..., None, None], states, h0, parallel=p)
        for p in (True, False))
    assert_allclose(prev_p, prev_s, dtype=jnp.float32, contraction=13)
    assert_allclose(fin_p, fin_s, dtype=jnp.float32, contraction=13)
    assert_allclose(prev_s[:, 1], decay[:, 0, :, None, None] * h0 + states[:, 0], dtype=jnp.float32,
                    contraction=1)


@pytest.mark.parametrize("implementation,chunk", [("xla", 8), ("pallas", 16)])
def test_streaming_in_pieces_with_carried_state_equals_one_pass(implementation, chunk):
    x, dt, A, B, C, D, _ = _inputs(3, 1, 45, 2, 4, 1, 16)
    seg = _segments("random", 1, 45)
    run = jax.jit(lambda x, dt, B, C, h, seg: ssd(x, dt, A, B, C, D=D, initial_state=h, segment_ids=seg,
                                                  chunk=chunk, implementation=implementation,
                                                  interpret=True))
    y_full, h_full = run(x, dt, B, C, jnp.zeros((1, 2, 4, 16)), seg)
    ys, h = [], jnp.zeros((1, 2, 4, 16))
    for lo in (0, 15, 30):  # three pieces of 15 tokens: not chunk-aligned
        hi = lo + 15
        if lo and seg[0, lo] != seg[0, lo - 1]:
            h = jnp.zeros_like(h)  # the carried state belongs to the piece's first segment
        y, h = run(x[:, lo:hi], dt[:, lo:hi], B[:, lo:hi], C[:, lo:hi], h, seg[:, lo:hi])
        ys.append(y)
    assert_allclose(jnp.concatenate(ys, axis=1), y_full, dtype=jnp.float32, contraction=45 * 16)
    assert_allclose(h, h_full, dtype=jnp.float32, contraction=45)


def test_segment_reset_equals_running_documents_separately():
    # Independent of the reference's own reset logic: three documents packed in one row give
    # the outputs of three separate runs from a zero state (ids may repeat non-adjacently).
    x, dt, A, B, C, D, _ = _inputs(5, 1, 30, 2, 4, 1, 8)
    seg = jnp.asarray([[4] * 10 + [9] * 10 + [4] * 10], jnp.int32)
    doc_run = jax.jit(lambda x, dt, B, C: ssd_reference(x, dt, A, B, C, D))
    for impl in ("reference", "xla"):
        y, h = ssd(x, dt, A, B, C, D=D, segment_ids=seg, chunk=8, implementation=impl)
        for lo in (0, 10, 20):
            hi = lo + 10
            y_doc, h_doc = doc_run(x[:, lo:hi], dt[:, lo:hi], B[:, lo:hi], C[:, lo:hi])
            assert_allclose(y[:, lo:hi], y_doc, dtype=jnp.float32, contraction=30 * 8, err_msg=impl)
        assert_allclose(h, h_doc, dtype=jnp.float32, contraction=30, err_msg=impl)


def test_reference_recurrence_matches_numpy_loop():
    # The specification itself against a float64 loop over t, heads and state entries.
    x, dt, A, B, C, D, h0 = _inputs(9, 1, 6, 2, 3, 1, 4)
    y, h = jax.jit(ssd_reference)(x, dt, A, B, C, D, h0)
    xn, dtn, An, Bn, Cn, Dn = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D))
    hn = np.asarray(h0, np.float64).copy()
    yn = np.zeros(x.shape)
    for t in range(6):
        for hd in range(2):
            hn[0, hd] = np.exp(dtn[0, t, hd] * An[hd]) * hn[0, hd] + dtn[0, t, hd] * np.outer(xn[0, t, hd], Bn[0, t, 0])
            yn[0, t, hd] = hn[0, hd] @ Cn[0, t, 0] + Dn[hd] * xn[0, t, hd]
    np.testing.assert_allclose(np.asarray(y), yn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), hn, rtol=1e-5, atol=1e-5)


def test_xla_bf16_inputs_stay_within_bf16_tolerance():
    x, dt, A, B, C, D, h0 = _inputs(11, 1, 40, 2, 8, 1, 16, dtype=jnp.bfloat16)
    y_ref, h_ref = jax.jit(ssd_reference)(x, dt, A, B, C, D, h0)
    y, h = ssd(x, dt, A, B, C, D=D, initial_state=h0, chunk=16, implementation="xla")
    assert y.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
    assert_allclose(y.astype(jnp.float32) / scale, y_ref.astype(jnp.float32) / scale,
                    dtype=jnp.bfloat16, contraction=16)
    assert_allclose(h / 10, h_ref / 10, dtype=jnp.bfloat16, contraction=16)


def test_default_implementation_is_xla_off_gpu():
    assert resolve_implementation(None, 64) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    assert resolve_implementation(None, 24) == "xla"  # not a Triton block size


_BAD = [
    ({"dt": (2, 9, 4)}, "dt shape"),
    ({"A": (3,)}, "A shape"),
    ({"B": (2, 10, 3, 8), "C": (2, 10, 3, 8)}, "groups G=3"),
    ({"C": (2, 10, 2, 4)}, "C shape"),
    ({"D": (5,)}, "D shape"),
    ({"initial_state": (2, 4, 8, 16)}, "initial_state shape"),
    ({"segment_ids": (2, 11)}, "segment_ids shape"),
    ({"chunk": 0}, "chunk=0"),
    ({"chunk": 24, "implementation": "pallas", "interpret": True}, "chunk=24"),
    ({"implementation": "cuda"}, "implementation='cuda'"),
]


@pytest.mark.parametrize("override,needle", _BAD)
def test_bad_input_raises_one_clear_kernel_input_error(override, needle):
    shapes = {"x": (2, 10, 4, 8), "dt": (2, 10, 4), "A": (4,), "B": (2, 10, 2, 8), "C": (2, 10, 2, 8)}
    arrays = {k: jnp.zeros(override.get(k, v)) for k, v in shapes.items()}
    kw = {k: v for k, v in override.items() if k not in shapes}
    for k in ("D", "initial_state"):
        if k in kw:
            kw[k] = jnp.zeros(kw[k])
    if "segment_ids" in kw:
        kw["segment_ids"] = jnp.zeros(kw["segment_ids"], jnp.int32)
    with pytest.raises(KernelInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ssd(arrays["x"], arrays["dt"], arrays["A"], arrays["B"], arrays["C"], **kw)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU-only error")
def test_pallas_without_gpu_or_interpret_is_an_error_not_a_fallback():
    x, dt, A, B, C, _, _ = _inputs(0, 1, 16, 1, 16, 1, 16)
    with pytest.raises(KernelInputError, match="needs a GPU"):
        ssd(x, dt, A, B, C, implementation="pallas")
