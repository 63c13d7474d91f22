"""Block-sparse attention: the Pallas kernel (interpret mode) and the XLA gather path against the
dense reference, forward and gradients, over hypothesis-drawn selections; the reference against a
numpy brute force of the Selection contract and against jax.nn.dot_product_attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.sparse_attention import Selection, attend, with_transpose
from kernels.sparse_attention.selection import tables_from_masks
from kernels.testing import assert_allclose, check_outputs_and_grads, random_normal

_SETTINGS = settings(max_examples=3, deadline=None, derandomize=True)


# ---------------------------------------------------------------- an independent numpy spec


def _np_allowed(sel, b, h, t, s):
    """[T, S + E] bool for batch b, head h: the Selection contract written out in numpy."""
    pick = lambda x, i: None if x is None else np.asarray(x)[min(i, np.asarray(x).shape[0] - 1)]
    kvb, cnt = pick(sel.kv_blocks, b), pick(sel.counts, b)
    hs = min(h, kvb.shape[0] - 1)
    qpos, kpos = pick(sel.q_positions, b), pick(sel.k_positions, b)
    qseg, kseg = pick(sel.q_segment_ids, b), pick(sel.k_segment_ids, b)
    e = sel.n_extra
    if e:
        kpos = np.concatenate([kpos, pick(sel.extra_positions, b)])
        if qseg is not None:
            kseg = np.concatenate([kseg, pick(sel.extra_segment_ids, b)])
    n_main = math.ceil(s / sel.block_k)
    j = np.arange(s + e)
    blk = np.where(j < s, j // sel.block_k, n_main + (j - s) // sel.block_k)
    out = np.zeros((t, s + e), bool)
    for i in range(t):
        qb = i // sel.block_q
        ok = np.isin(blk, kvb[hs, qb, : cnt[hs, qb]])
        if qseg is not None:
            ok &= qseg[i] == kseg
        diff = qpos[i] - kpos
        if sel.causal:
            ok &= diff >= 0
        if sel.window is not None:
            ok &= (j >= s) | (np.abs(diff) < sel.window) | (kpos < sel.sink_tokens)
        if sel.extra_span is not None:
            ok &= (j < s) | ((diff >= 0) & (diff < sel.extra_span))
        out[i] = ok
    return out


def _np_attention(q, k, v, sel, scale, softcap):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t, h_, d = q.shape
    s, g = k.shape[1], k.shape[2]
    if sel.n_extra:
        k = np.concatenate(
            [
                k,
                np.broadcast_to(np.asarray(sel.extra_k, np.float64), (b_,) + sel.extra_k.shape[1:]),
            ],
            1,
        )
        v = np.concatenate(
            [
                v,
                np.broadcast_to(np.asarray(sel.extra_v, np.float64), (b_,) + sel.extra_v.shape[1:]),
            ],
            1,
        )
    out = np.zeros_like(q)
    n_main = math.ceil(s / sel.block_k)
    j = np.arange(k.shape[1])
    blk = np.where(j < s, j // sel.block_k, n_main + (j - s) // sel.block_k)
    for b in range(b_):
        for h in range(h_):
            allowed = _np_allowed(sel, b, h, t, s)
            kk = k[b, :, h // (h_ // g)]
            for i in range(t):
                keys = kk
                if sel.kv_shift is not None:
                    # Rotate every key by its block's shift (rotate-half RoPE).
                    bs, hs = min(b, sel.kv_shift.shape[0] - 1), min(h, sel.kv_shift.shape[1] - 1)
                    row = np.asarray(sel.kv_blocks)[bs, hs, i // sel.block_q]
                    shifts = np.asarray(sel.kv_shift)[bs, hs, i // sel.block_q]
                    sh = np.zeros(kk.shape[0])
                    for slot, bl in enumerate(row):
                        sh[blk == bl] = shifts[slot]
                    f = np.concatenate([sel.rope_inv_freq, sel.rope_inv_freq]).astype(np.float64)
                    ang = sh[:, None] * f[None]
                    rot = np.concatenate([-kk[:, d // 2 :], kk[:, : d // 2]], 1)
                    keys = kk * np.cos(ang) + rot * np.sin(ang)
                logits = keys @ q[b, i, h] * scale
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                m = allowed[i]
                if not m.any():
                    continue
                w = np.exp(logits[m] - logits[m].max())
                out[b, i, h] = (w / w.sum()) @ v[b, m, h // (h_ // g)]
    return out


# ---------------------------------------------------------------- random selections


def _random_selection(
    rng,
    *,
    b,
    h,
    t,
    d,
    block_q,
    block_k,
    per_head,
    causal,
    window,
    sinks,
    segments,
    n_extra,
    extra_span,
    shift,
    density,
):
    """A Selection with random live blocks; full counts computed exactly from the element masks."""
    n_q, n_main = math.ceil(t / block_q), math.ceil(t / block_k)
    n_kv = n_main + math.ceil(n_extra / block_k)
    bs, hs = b, (h if per_head else 1)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (bs, t)).copy()
    seg = None
    if segments:
        cuts = np.sort(rng.choice(np.arange(1, t), size=segments, replace=False))
        seg = np.broadcast_to(
            np.searchsorted(cuts, np.arange(t), side="right").astype(np.int32), (bs, t)
        ).copy()
        starts = np.concatenate([[0], cuts])
        pos = np.broadcast_to((np.arange(t) - starts[seg[0]]).astype(np.int32), (bs, t)).copy()
    extra = {}
    if n_extra:
        extra = {
            "extra_k": random_normal(
                jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, n_extra, h, d)
            ),
            "extra_v": random_normal(
                jax.random.PRNGKey(int(rng.integers(1 << 30))), (1, n_extra, h, d)
            ),
            "extra_positions": rng.integers(0, t, (bs, n_extra)).astype(np.int32),
            "extra_segment_ids": None
            if seg is None
            else rng.integers(0, segments + 1, (bs, n_extra)).astype(np.int32),
        }
    live = rng.random((bs, hs, n_q, n_kv)) < density
    sel = Selection(
        kv_blocks=np.zeros((bs, hs, n_q, 1), np.int32),
        counts=np.zeros((bs, hs, n_q), np.int32),
        q_positions=pos,
        k_positions=pos,
        q_segment_ids=seg,
        k_segment_ids=seg,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        window=window,
        sink_tokens=sinks,
        extra_span=extra_span,
        **extra,
    )
    # Exact "full" flags: every element pair of the block pair allowed (dense brute force).
    dense_all = Selection(
        **{
            **sel.__dict__,
            "kv_blocks": np.broadcast_to(np.arange(n_kv, dtype=np.int32), (bs, hs, n_q, n_kv)),
            "counts": np.full((bs, hs, n_q), n_kv, np.int32),
        }
    )
    full = np.zeros_like(live)
    tp = n_q * block_q
    for bi in range(bs):
        for hi in range(hs):
            allowed = _np_allowed(dense_all, bi, hi, t, t)
            pad_q = np.pad(allowed, [(0, tp - t), (0, 0)])
            main = np.pad(pad_q[:, :t], [(0, 0), (0, n_main * block_k - t)])
            ex = pad_q[:, t:]
            ex = np.pad(ex, [(0, 0), (0, (n_kv - n_main) * block_k - ex.shape[1])])
            full_el = np.concatenate([main, ex], 1).reshape(n_q, block_q, n_kv, block_k)
            real_q = (np.arange(tp) < t).reshape(n_q, block_q)
            real_k = np.concatenate(
                [np.arange(n_main * block_k) < t, np.arange((n_kv - n_main) * block_k) < n_extra]
            ).reshape(n_kv, block_k)
            full[bi, hi] = (full_el | ~real_q[:, :, None, None]).all((1, 3)) & real_k.all(1)[
                None, :
            ]
    kvb, cnt, fc = tables_from_masks(live, full & live)
    kv_shift = rope = None
    if shift:
        kv_shift = rng.integers(0, 40, kvb.shape).astype(np.int32)
        rope = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    return with_transpose(
        sel.replace(
            kv_blocks=kvb, counts=cnt, full_counts=fc, kv_shift=kv_shift, rope_inv_freq=rope
        )
    )


# Hypothesis tries the simplest example first (the first entry of each sampled_from): order the
# choices so that it is already a rich case; later examples vary each feature.
@st.composite
def _cases(draw):
    g = draw(st.sampled_from([2, 1]))
    r = draw(st.sampled_from([2, 1]))
    return {
        "b": draw(st.sampled_from([2, 1])),
        "g": g,
        "h": g * r,
        "t": draw(st.sampled_from([45, 17, 64, 33])),
        "d": draw(st.sampled_from([32, 16])),
        "block_q": draw(st.sampled_from([16, 32])),
        "block_k": 16,
        "per_head": draw(st.sampled_from([True, False])),
        "causal": draw(st.sampled_from([True, False])),
        "window": draw(st.sampled_from([20, None, 5])),
        "sinks": draw(st.sampled_from([3, 0])),
        "segments": draw(st.sampled_from([2, 0])),
        "n_extra": draw(st.sampled_from([7, 0])),
        "extra_span": draw(st.sampled_from([12, None])),
        "shift": draw(st.sampled_from([True, False])),
        "density": draw(st.sampled_from([0.6, 1.0])),
        "softcap": draw(st.sampled_from([5.0, None])),
        "dtype": draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        "seed": draw(st.integers(0, 1000)),
    }


def _qkv(seed, b, t, h, g, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        random_normal(ks[0], (b, t, h, d), dtype),
        random_normal(ks[1], (b, t, g, d), dtype),
        random_normal(ks[2], (b, t, g, d), dtype),
    )


@_SETTINGS
@given(_cases())
def test_pallas_and_xla_match_reference_forward_and_grads_on_random_selections(case):
    rng = np.random.default_rng(case["seed"])
    sel = _random_selection(
        rng,
        b=case["b"],
        h=case["h"],
        t=case["t"],
        d=case["d"],
        block_q=case["block_q"],
        block_k=case["block_k"],
        per_head=case["per_head"],
        causal=case["causal"],
        window=case["window"],
        sinks=case["sinks"],
        segments=case["segments"],
        n_extra=case["n_extra"],
        extra_span=case["extra_span"],
        shift=case["shift"],
        density=case["density"],
    )
    if sel.n_extra and case["g"] != case["h"]:  # extra rows have G kv heads
        sel = sel.replace(
            extra_k=sel.extra_k[:, :, : case["g"]], extra_v=sel.extra_v[:, :, : case["g"]]
        )
    q, k, v = _qkv(
        case["seed"], case["b"], case["t"], case["h"], case["g"], case["d"], case["dtype"]
    )
    cap = case["softcap"]
    impl = lambda name: (
        lambda q, k, v: attend(q, k, v, sel, implementation=name, interpret=True, softcap=cap)
    )
    check_outputs_and_grads(
        {"pallas": impl("pallas"), "xla": impl("xla")},
        impl("reference"),
        (q, k, v),
        dtype=case["dtype"],
        contraction=case["t"] + case["n_extra"],
        scale=4.0,
    )


def test_reference_matches_numpy_bruteforce_of_the_selection_contract():
    rng = np.random.default_rng(3)
    b, t, h, g, d = 2, 37, 4, 2, 16
    for per_head, causal, window, shift in [(True, True, 9, True), (False, False, 6, False)]:
        sel = _random_selection(
            rng,
            b=b,
            h=h,
            t=t,
            d=d,
            block_q=16,
            block_k=16,
            per_head=per_head,
            causal=causal,
            window=window,
            sinks=2,
            segments=2,
            n_extra=5,
            extra_span=10,
            shift=shift,
            density=0.7,
        )
        sel = sel.replace(extra_k=sel.extra_k[:, :, :g], extra_v=sel.extra_v[:, :, :g])
        q, k, v = _qkv(1, b, t, h, g, d, jnp.float32)
        ref = jax.jit(
            lambda q, k, v, sel=sel: attend(q, k, v, sel, implementation="reference", softcap=3.0)
        )
        got = ref(q, k, v)
        want = _np_attention(q, k, v, sel, d**-0.5, 3.0)
        assert_allclose(got, want, dtype=jnp.float32, contraction=t + 5)


def _causal_selection(t, bq, bk):
    n_q, n_k = math.ceil(t / bq), math.ceil(t / bk)
    i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
    live = j * bk <= np.minimum((i + 1) * bq, t) - 1
    full = ((j + 1) * bk - 1 <= i * bq) & ((j + 1) * bk <= t) & ((i + 1) * bq <= t)
    kvb, cnt, fc = tables_from_masks(live[None, None], full[None, None])
    pos = np.arange(t, dtype=np.int32)[None]
    return with_transpose(
        Selection(
            kv_blocks=kvb,
            counts=cnt,
            full_counts=fc,
            q_positions=pos,
            k_positions=pos,
            block_q=bq,
            block_k=bk,
            causal=True,
        )
    )


def test_all_causal_selection_equals_dot_product_attention():
    b, t, h, g, d = 2, 45, 4, 2, 32
    q, k, v = _qkv(5, b, t, h, g, d, jnp.float32)
    sel = _causal_selection(t, 16, 32)
    anchor = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    impl = lambda name: lambda q, k, v: attend(q, k, v, sel, implementation=name, interpret=True)
    check_outputs_and_grads(
        {"pallas": impl("pallas"), "xla": impl("xla"), "reference": impl("reference")},
        anchor,
        (q, k, v),
        dtype=jnp.float32,
        contraction=t,
        scale=4.0,
    )


def test_rows_with_no_allowed_key_give_zero_output_and_gradient():
    b, t, h, d = 1, 32, 2, 16
    q, k, v = _qkv(2, b, t, h, h, d, jnp.float32)
    pos = np.arange(t, dtype=np.int32)[None]
    # Query block 0 has no live block at all; block 1 sees only key block 1.
    sel = with_transpose(
        Selection(
            kv_blocks=np.array([[[[0], [1]]]], np.int32),
            counts=np.array([[[0, 1]]], np.int32),
            q_positions=pos,
            k_positions=pos,
            block_q=16,
            block_k=16,
            causal=True,
        )
    )

    @jax.jit
    def run(q):
        res = {}
        for name in ("pallas", "xla"):
            out, pull = jax.vjp(
                lambda q, name=name: attend(q, k, v, sel, implementation=name, interpret=True), q
            )
            res[name] = (out, pull(jnp.ones_like(out))[0])
        return res

    for name, (out, dq) in run(q).items():
        assert float(jnp.abs(out[:, :16]).max()) == 0.0, name
        assert float(jnp.abs(dq[:, :16]).max()) == 0.0, name
        assert float(jnp.abs(out[:, 16:]).max()) > 0.0, name
