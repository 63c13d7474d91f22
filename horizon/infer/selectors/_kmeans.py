"""Masked Lloyd k-means with a deterministic init, for Squeezed Attention's offline key clustering
(Hooper et al., 2024). Pure jnp; one (points, valid) set per call, vmapped by callers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_indices(n_valid, n_clusters: int):
    """[C] int32: the points the centroids start from, spread evenly over the valid prefix
    [0, n_valid): point floor(c * n_valid / C) (deterministic, covers the whole context)."""
    c = jnp.arange(n_clusters, dtype=jnp.int32)
    return (c * jnp.asarray(n_valid, jnp.int32)) // n_clusters


def lloyd(x_ND, n_valid, *, n_clusters: int, iters: int, weights_N=None):
    """k-means of the first n_valid rows of x_ND (rows >= n_valid are ignored).

    Init: centroids = x[init_indices]; then `iters` rounds of: assign each point to the nearest
    centroid (squared Euclidean, ties to the lower index), move each centroid to the (weighted)
    mean of its points; a centroid with no points stays where it was.
    Returns (centroids [C, D] float32, assign [N] int32 (C for ignored rows), sizes [C] float32:
    the summed weights, point counts when weights_N is None).
    """
    n = x_ND.shape[0]
    x = x_ND.astype(jnp.float32)
    valid = jnp.arange(n) < n_valid
    w = jnp.ones((n,), jnp.float32) if weights_N is None else weights_N.astype(jnp.float32)
    w = jnp.where(valid, w, 0.0)
    cent = x[init_indices(n_valid, n_clusters)]

    def assign_of(cent):
        d2 = jnp.sum(cent * cent, -1)[None, :] - 2.0 * (x @ cent.T)  # + |x|^2, constant per row
        return jnp.where(valid, jnp.argmin(d2, -1), n_clusters).astype(jnp.int32)

    def step(cent, _):
        a = assign_of(cent)
        sums = jax.ops.segment_sum(x * w[:, None], a, num_segments=n_clusters + 1)[:n_clusters]
        cnt = jax.ops.segment_sum(w, a, num_segments=n_clusters + 1)[:n_clusters]
        new = jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1e-30)[:, None], cent)
        return new, None

    cent, _ = jax.lax.scan(step, cent, None, length=iters)
    a = assign_of(cent)
    sizes = jax.ops.segment_sum(w, a, num_segments=n_clusters + 1)[:n_clusters]
    return cent, a, sizes
