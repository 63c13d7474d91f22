"""Held-out loss by position bucket: the extrapolation curve of a model evaluated at lengths beyond
its training length (as in ALiBi, Press et al., 2022, and the RoPE-scaling papers).

Positions are the per-document positions of horizon.data.batches, so packed windows count each
token at its distance from its own document's start.
"""

from __future__ import annotations

import numpy as np

from horizon.eval.harness import logits_fn


def loss_by_position(model, batches, *, n_batches: int, bucket: int, forward=None) -> dict:
    """Mean next-token loss (nats) per bucket of `bucket` positions over batches 0..n_batches-1 of
    `batches` (a horizon.data.batches.Batches at the length to measure); `forward`: a
    horizon.eval.harness.logits_fn(model) to share its compilations.

    Returns {"bucket_start": [...], "loss": [...], "count": [...]}, buckets that held tokens only.
    """
    forward = forward or logits_fn(model)
    sums, counts = np.zeros(0), np.zeros(0, np.int64)
    for i in range(n_batches):
        b = batches.batch(i)
        logits = forward(b["inputs"], b["positions"], b["segment_ids"])
        ce = _cross_entropy(logits, b["targets"])
        keep = b["weights"] > 0
        idx = (b["positions"][keep] // bucket).astype(np.int64)
        n = max(len(sums), int(idx.max()) + 1 if idx.size else 0)
        sums = np.pad(sums, (0, n - len(sums))) + np.bincount(idx, weights=ce[keep].astype(np.float64), minlength=n)
        counts = np.pad(counts, (0, n - len(counts))) + np.bincount(idx, minlength=n)
    live = np.flatnonzero(counts)
    return {"bucket_start": [int(k * bucket) for k in live], "loss": [float(sums[k] / counts[k]) for k in live],
            "count": [int(counts[k]) for k in live]}


def _cross_entropy(logits_BTV: np.ndarray, targets_BT: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target], float64 [B, T]."""
    x = logits_BTV.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
    return lse - np.take_along_axis(x, targets_BT[..., None].astype(np.int64), axis=-1)[..., 0]
