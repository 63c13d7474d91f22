"""Sparse decode attention: the split-K Pallas kernel (interpret mode) and the XLA gather path
against the dense reference over hypothesis-drawn selections (token and page granularity, shared and
per-head indices, GQA, ragged counts and lengths, 1-4 splits); the reference against a numpy brute
force of the index contract; bad input raises KernelInputError."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.errors import KernelInputError
from kernels.sparse_decode import DecodeConfig, decode_attend
from kernels.testing import assert_allclose

_SETTINGS = settings(max_examples=3, deadline=None, derandomize=True)
_CFG = DecodeConfig(block_k=16)  # small blocks so a few dozen selected slots span several splits


def _case(seed, *, b, h, g, d, s, page_size, k, hs, dtype=jnp.float32, ragged=True):
    rng = np.random.default_rng(seed)
    n_pages = s // page_size
    idx = np.stack(
        [[rng.permutation(n_pages)[:k] for _ in range(hs)] for _ in range(b)]
    ).astype(np.int32)
    cnt = rng.integers(0, k + 1, (b, hs)) if ragged else np.full((b, hs), k)
    lengths = rng.integers(s // 2, s + 1, (b,)).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, s, g, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, s, g, d)), dtype)
    return q, kc, vc, jnp.asarray(idx), jnp.asarray(cnt.astype(np.int32)), jnp.asarray(lengths)


def _np_decode(q, kc, vc, idx, cnt, page_size, lengths, softcap=None):
    """Brute force in float64: loop over rows, collect the allowed slots, softmax over them."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    idx, cnt, lengths = np.asarray(idx), np.asarray(cnt), np.asarray(lengths)
    b_, h_, d = q.shape
    r = h_ // kc.shape[2]
    out = np.zeros_like(q)
    for b in range(b_):
        for h in range(h_):
            hs = min(h, idx.shape[1] - 1)
            slots = sorted(
                {p * page_size + o for p in idx[b, hs, : cnt[b, hs]] for o in range(page_size)}
            )
            slots = [t for t in slots if t < lengths[b]]
            if not slots:
                continue
            logit = kc[b, slots, h // r] @ q[b, h] / np.sqrt(d)
            if softcap is not None:
                logit = softcap * np.tanh(logit / softcap)
            p = np.exp(logit - logit.max())
            out[b, h] = p @ vc[b, slots, h // r] / p.sum()
    return out


def test_reference_matches_numpy_brute_force_with_pages_and_softcap():
    args = _case(0, b=2, h=4, g=2, d=8, s=48, page_size=4, k=5, hs=4)
    q, kc, vc, idx, cnt, ln = args
    for cap in (None, 2.0):
        ref = decode_attend(q, kc, vc, idx, cnt, page_size=4, lengths_B=ln, softcap=cap,
                            implementation="reference")
        np.testing.assert_allclose(np.asarray(ref), _np_decode(q, kc, vc, idx, cnt, 4, ln, cap),
                                   rtol=1e-5, atol=1e-5)


@_SETTINGS
@given(
    page_size=st.sampled_from([1, 4, 8]),
    per_head=st.booleans(),
    ratio=st.sampled_from([1, 2, 4]),
    n_splits=st.integers(1, 4),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_pallas_and_xla_equal_reference(page_size, per_head, ratio, n_splits, dtype, seed):
    g, d = 2, 32
    h = g * ratio
    s = 128
    k = 64 // page_size  # 64 selected slots: four 16-slot steps to share among the splits
    args = _case(seed, b=2, h=h, g=g, d=d, s=s, page_size=page_size, k=k,
                 hs=h if per_head else 1, dtype=dtype)
    kw = dict(page_size=page_size, lengths_B=args[-1])
    ref = decode_attend(*[x.astype(jnp.float32) if x.dtype == dtype else x for x in args[:5]],
                        implementation="reference", **kw)
    xla = decode_attend(*args[:5], implementation="xla", **kw)
    pal = decode_attend(*args[:5], implementation="pallas", interpret=True, n_splits=n_splits,
                        config=_CFG, **kw)
    assert_allclose(xla, ref, dtype=dtype, contraction=64, err_msg="xla")
    assert_allclose(pal, ref, dtype=dtype, contraction=64, err_msg=f"pallas n_splits={n_splits}")


def test_split_merge_equals_single_pass_with_softcap_and_empty_rows():
    # Full counts on some rows, zero on others (output 0), lengths cutting pages: 2 and 4 splits
    # must all give the one-pass (n_splits=1) answer to fp32 rounding.
    q, kc, vc, idx, cnt, ln = _case(3, b=2, h=4, g=4, d=16, s=128, page_size=2, k=32, hs=4)
    cnt = cnt.at[0, 1].set(0).at[1, 2].set(32)
    kw = dict(page_size=2, lengths_B=ln, softcap=3.0, implementation="pallas", interpret=True,
              config=_CFG)
    one = decode_attend(q, kc, vc, idx, cnt, n_splits=1, **kw)
    ref = decode_attend(q, kc, vc, idx, cnt, page_size=2, lengths_B=ln, softcap=3.0,
                        implementation="reference")
    np.testing.assert_array_equal(np.asarray(one[0, 1]), 0.0)
    assert_allclose(one, ref, dtype=jnp.float32, contraction=64)
    for n in (2, 4):
        assert_allclose(decode_attend(q, kc, vc, idx, cnt, n_splits=n, **kw), one,
                        dtype=jnp.float32, contraction=4, err_msg=f"n_splits={n}")


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=_sds((2, 4, 8, 1))), "q_BHD must be 3-D"),
        (dict(k=_sds((2, 64, 3, 16)), v=_sds((2, 64, 3, 16))), "multiple of kv heads"),
        (dict(v=_sds((2, 32, 2, 16))), "differs from k_cache_BSGD"),
        (dict(q=_sds((2, 4, 16), jnp.bfloat16)), "dtypes differ"),
        (dict(q=_sds((2, 4, 16), jnp.int32)), "dtype int32"),
        (dict(page_size=3), "not a multiple of page_size=3"),
        (dict(page_size=0), "page_size=0"),
        (dict(idx=_sds((2, 3, 5), jnp.int32), cnt=_sds((2, 3), jnp.int32)), "Hs=3"),
        (dict(idx=_sds((2, 1, 5), jnp.float32)), "integer array"),
        (dict(cnt=_sds((2, 4), jnp.int32)), "counts_BHs must be"),
        (dict(lengths=_sds((3,), jnp.int32)), "lengths_B must be"),
        (dict(softcap=-1.0), "softcap=-1.0"),
        (dict(n_splits=0), "n_splits=0"),
        (dict(config=DecodeConfig(block_k=24)), "block_k=24"),
        (dict(implementation="cuda"), "implementation='cuda'"),
    ],
)
def test_bad_inputs_raise_kernel_input_error(change, message):
    a = dict(q=_sds((2, 4, 16)), k=_sds((2, 64, 2, 16)), v=_sds((2, 64, 2, 16)),
             idx=_sds((2, 1, 5), jnp.int32), cnt=_sds((2, 1), jnp.int32), lengths=None,
             page_size=1, softcap=None, n_splits=None, config=None, implementation="pallas")
    a.update(change)

    def f(q, k, v, idx, cnt, lengths):
        return decode_attend(q, k, v, idx, cnt, lengths_B=lengths, page_size=a["page_size"],
                             softcap=a["softcap"], n_splits=a["n_splits"], config=a["config"],
                             implementation=a["implementation"], interpret=True)

    with pytest.raises(KernelInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jax.eval_shape(f, a["q"], a["k"], a["v"], a["idx"], a["cnt"], a["lengths"])
