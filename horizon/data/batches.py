"""Batches as a pure function of (seed, step): random windows of T + 1 tokens from one split,
with segment ids (document masking) and per-document positions.

Documents are split once into train / held-out by a fixed permutation of document indices, so a
held-out window never contains a training document.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from horizon.config import Data
from horizon.data.store import TokenStore
from horizon.errors import DataError

_SPLIT_SEED = 0x5EED
SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class Split:
    """The documents of one split concatenated: tokens, document starts, source document ids."""

    tokens: np.ndarray
    starts: np.ndarray  # int64 [n_docs + 1]
    doc_ids: np.ndarray  # int64 [n_docs], indices into the store


def split_documents(store: TokenStore, heldout_fraction: float) -> dict[str, np.ndarray]:
    """Document indices of each split: a fixed permutation, the first fraction held out."""
    n = store.n_docs
    n_held = max(1, int(round(heldout_fraction * n)))
    if n - n_held < 1:
        raise DataError(f"store {store.path} has {n} documents; need at least 2 for a held-out split")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return {"heldout": np.sort(perm[:n_held]), "train": np.sort(perm[n_held:])}


def make_split(store: TokenStore, doc_ids: np.ndarray) -> Split:
    pieces = [store.document(int(i)) for i in doc_ids]
    lengths = np.array([len(p) for p in pieces], np.int64)
    return Split(np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)]), doc_ids)


class Batches:
    """`batch(step)` for one split: dict of int32 [B, T] arrays inputs, targets, positions,
    segment_ids and float32 weights (0 where the target belongs to another document)."""

    def __init__(self, store: TokenStore, cfg: Data, *, split: str, seed: int):
        ids = split_documents(store, cfg.heldout_fraction)[split]
        self.split = make_split(store, ids)
        self.cfg, self.seed, self.split_id = cfg, seed, SPLITS[split]
        if len(self.split.tokens) < cfg.seq_len + 1:
            raise DataError(f"{split} split has {len(self.split.tokens)} tokens, fewer than data.seq_len + 1 = "
                            f"{cfg.seq_len + 1}; use a larger corpus or a shorter data.seq_len")

    def batch(self, step: int) -> dict[str, np.ndarray]:
        cfg, sp = self.cfg, self.split
        T, B = cfg.seq_len, cfg.batch_size
        rng = np.random.default_rng([self.seed, self.split_id, step])
        starts = rng.integers(0, len(sp.tokens) - T, size=B)
        idx_BW = starts[:, None] + np.arange(T + 1)[None, :]  # W = T + 1
        window = sp.tokens[idx_BW].astype(np.int32)
        doc_BW = np.searchsorted(sp.starts, idx_BW, side="right") - 1
        if cfg.pack_documents:
            seg_BW = (doc_BW - doc_BW[:, :1]).astype(np.int32)
            first_BW = np.maximum(sp.starts[doc_BW], starts[:, None])  # a document's first token in the window
            pos_BW = (idx_BW - first_BW).astype(np.int32)
        else:
            seg_BW = np.zeros_like(window)
            pos_BW = np.broadcast_to(np.arange(T + 1, dtype=np.int32), window.shape)
        weights = (seg_BW[:, 1:] == seg_BW[:, :-1]) if cfg.pack_documents else np.ones((B, T), bool)
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "positions": np.ascontiguousarray(pos_BW[:, :-1]),
            "segment_ids": seg_BW[:, :-1],
            "weights": weights.astype(np.float32),
        }
