"""Sampling and the speculative acceptance rule against enumerations: top-p keeps exactly the
smallest nucleus; the rule's emitted-token distribution equals the target's, exactly (enumerating
the draft token with the rule's own acceptance and residual functions) and statistically (running
the sampler with fixed keys, chi-square bounded); temperature 0 is greedy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.infer.sampling import sample_token, token_probs, top_p_mask
from horizon.infer.speculative import accept_draft, acceptance_prob, residual


def _smallest_nucleus(p, top_p):
    """Brute force: among all token subsets with mass >= top_p, those of the fewest tokens; then the
    one of largest mass (unique for distinct probabilities)."""
    best = None
    for r in range(1, len(p) + 1):
        for s in itertools.combinations(range(len(p)), r):
            if p[list(s)].sum() >= top_p and (best is None or p[list(s)].sum() > p[list(best)].sum()):
                best = s
        if best is not None:
            return set(best)


@pytest.mark.parametrize("seed", range(6))
def test_top_p_keeps_exactly_the_smallest_nucleus(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(7))
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.99):
        got = set(np.flatnonzero(np.asarray(top_p_mask(jnp.asarray(p[None], jnp.float32), top_p))[0]))
        assert got == _smallest_nucleus(p.astype(np.float32).astype(np.float64), top_p), (top_p, p)


def test_token_probs_renormalizes_the_nucleus_and_temperature_zero_is_one_hot():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0]])
    p = np.exp([1.0, 0.5, 0.25, -0.5])
    p /= p.sum()
    got = np.asarray(token_probs(logits, temperature=2.0, top_p=0.7))[0]
    keep = _smallest_nucleus(p, 0.7)
    want = np.array([p[i] if i in keep else 0.0 for i in range(4)])
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(token_probs(logits, temperature=0.0))[0], [1, 0, 0, 0])
    assert int(sample_token(jax.random.PRNGKey(0), logits, temperature=0.0)[0]) == 0


def _dists(seed, V, k):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(V), size=k + 1), rng.dirichlet(np.ones(V) * 0.7, size=k)


@pytest.mark.parametrize("seed", range(4))
def test_acceptance_rule_emits_the_target_distribution_exactly(seed):
    V = 6
    p, q = _dists(seed, V, 1)
    p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    # P(emit y) = sum_x q(x) [a(x) 1{y = x} + (1 - a(x)) r(y)], with the rule's own a and r
    r = np.asarray(residual(p[0], q[0]))
    emitted = np.zeros(V)
    for x in range(V):
        a = float(acceptance_prob(p[0], q[0], x))
        emitted[x] += float(q[0, x]) * a
        emitted += float(q[0, x]) * (1 - a) * r
    np.testing.assert_allclose(emitted, np.asarray(p[0]), atol=1e-6)


def test_speculative_sampler_matches_the_target_statistically():
    V, k, N = 5, 2, 60_000
    p, q = _dists(7, V, k)
    pj, qj = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), N)

    @jax.jit
    def one(key):
        kd, ka = jax.random.split(key)
        drafts = jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(jax.random.split(kd, k), qj)
        n, nxt = accept_draft(ka, pj, qj, drafts.astype(jnp.int32))
        emitted = jnp.concatenate([drafts.astype(jnp.int32), jnp.zeros((1,), jnp.int32)]).at[n].set(nxt)
        return n, emitted

    n, emitted = jax.vmap(one)(keys)
    n, emitted = np.asarray(n), np.asarray(emitted)
    # position 0 is always emitted; position 1 whenever the first draft token was kept
    for pos, rows in ((0, np.ones(N, bool)), (1, n >= 1)):
        counts = np.bincount(emitted[rows, pos], minlength=V)
        expected = p[pos] * rows.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 25.0, (pos, counts, expected)  # df = 4: P(chi2 > 25) ~ 5e-5
    # and the number kept has the closed-form law: P(n >= 1) = sum_x min(p(x), q(x))
    np.testing.assert_allclose((n >= 1).mean(), np.minimum(p[0], q[0]).sum(), atol=0.01)


def test_identical_draft_and_target_accept_every_token():
    p, _ = _dists(3, 5, 3)
    pj = jnp.asarray(p, jnp.float32)
    n, _ = accept_draft(jax.random.PRNGKey(1), pj, pj[:3], jnp.asarray([0, 1, 2], jnp.int32))
    assert int(n) == 3
