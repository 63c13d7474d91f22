"""Every policy's Selection through the Pallas kernel (interpret mode) and the XLA gather path equals
the dense masked reference on the same Selection, forward and gradients for q, k and v (through
the policy too: EMA sinks and CCA core tokens are functions of k and v), over hypothesis-drawn
lengths, heads, grouped-query ratios, windows, sink counts and segment layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon.attention import policies
from kernels.sparse_attention import attend
from kernels.testing import check_outputs_and_grads, random_normal

_BLOCK = 16


# Hypothesis tries the simplest example first (the first entry of each sampled_from): order the
# choices so that it is already a rich case (grouped heads, batch 2, three documents).
def _kwargs(name, draw):
    window = draw(st.sampled_from([20, 8, 40]))
    sinks = draw(st.sampled_from([3, 1]))
    return {
        "dense_causal": {},
        "sliding_window": {"window": window},
        "sinks": {"window": window, "n_sinks": sinks, "rope_inv_freq": True},
        "ema_sink": {"window": window, "n_sinks": sinks, "alpha": 0.8},
        "longgen": {
            "layer": draw(st.sampled_from([0, 1])),
            "n_layers": 3,
            "stride": 2,
            "local_blocks": 1,
        },
        "longheads": {"trained_length": 48, "rope_inv_freq": True},
        "hip": {"budget": 2},
        "cca": {"group": draw(st.sampled_from([8, 4])), "window": window},
    }[name]


@st.composite
def _cases(draw, name):
    g = draw(st.sampled_from([2, 1]))
    r = draw(st.sampled_from([2, 1]))
    t = draw(st.sampled_from([75, 17, 48, 61]))
    layout = draw(st.sampled_from([(0.3, 0.55), (), (0.5,), (0.1, 0.2, 0.9)]))
    cuts = sorted({min(max(int(f * t), 1), t - 1) for f in layout})
    return {
        "b": draw(st.sampled_from([2, 1])),
        "g": g,
        "h": g * r,
        "t": t,
        "d": 16,
        "cuts": cuts,
        "kwargs": _kwargs(name, draw),
        "seed": draw(st.integers(0, 99)),
    }


def _positions(t, cuts, b):
    """(positions [B, T], segment_ids [B, T]) for documents starting at 0 and at each cut; or
    (T, None) when there is a single document (the static, int-T path)."""
    if not cuts:
        return t, None
    seg = np.searchsorted(np.asarray(cuts), np.arange(t), side="right").astype(np.int32)
    starts = np.concatenate([[0], cuts])
    pos = (np.arange(t) - starts[seg]).astype(np.int32)
    return jnp.asarray(np.repeat(pos[None], b, 0)), jnp.asarray(np.repeat(seg[None], b, 0))


@pytest.mark.parametrize("name", sorted(policies.POLICIES))
def test_policy_selection_through_pallas_and_xla_matches_reference(name):
    @settings(max_examples=1, deadline=None, derandomize=True)
    @given(_cases(name))
    def check(case):
        b, t, h, g, d = case["b"], case["t"], case["h"], case["g"], case["d"]
        ks = jax.random.split(jax.random.PRNGKey(case["seed"]), 3)
        q = random_normal(ks[0], (b, t, h, d))
        k = random_normal(ks[1], (b, t, g, d))
        v = random_normal(ks[2], (b, t, g, d))
        pos, seg = _positions(t, case["cuts"], b)
        kwargs = dict(case["kwargs"])
        if kwargs.get("rope_inv_freq"):
            kwargs["rope_inv_freq"] = jnp.asarray(
                1.0 / 10000 ** (np.arange(0, d, 2) / d), jnp.float32
            )

        def through(impl):
            def f(q, k, v):
                sel = policies.build(
                    name,
                    pos,
                    seg,
                    q_BTHD=q,
                    k_BSGD=k,
                    v_BSGD=v,
                    block_q=_BLOCK,
                    block_k=_BLOCK,
                    **kwargs,
                )
                return attend(q, k, v, sel, implementation=impl, interpret=True)

            return f

        check_outputs_and_grads(
            {"pallas": through("pallas"), "xla": through("xla")},
            through("reference"),
            (q, k, v),
            dtype=jnp.float32,
            contraction=2 * t,
            scale=4.0,
            seed=case["seed"],
        )

    check()
