"""Batches as a pure function of (seed, step): random windows of T + 1 tokens from one split,
with segment ids (document masking) and per-document positions.

Documents are split once into train / held-out by a fixed permutation of document indices, so a
held-out window never contains a training document. Optional, each from its own random stream so
the windows stay the same: fill-in-the-middle samples (Bavarian et al., 2022) with horizon-length
targets (Ding et al., 2024), and PoSE position ids on the train split (Zhu et al., 2023).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from horizon.config import Data
from horizon.data.store import TokenStore
from horizon.errors import DataError

_SPLIT_SEED = 0x5EED
SPLITS = {"train": 0, "heldout": 1}
_POSE_STREAM, _FIM_STREAM = 1, 2  # extra words of the step's seed: independent of the window draw

# Fill-in-the-middle sentinels: byte values that never occur in UTF-8 (RFC 3629: 0xF5-0xFF are
# invalid), so byte-level text cannot contain them.
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_END = 0xF8, 0xF9, 0xFA, 0xFB
FIM_SENTINELS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_END)


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
    segment_ids and float32 weights (0 where the target belongs to another document); with
    data.fim_rate > 0 also float32 hlp_targets and hlp_weights (horizon-length prediction)."""

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
        extra = {}
        if cfg.fim_rate > 0:  # rebuild rows with FIM pieces; positions restart at each piece
            window, seg_BW, hlp_t_BW, hlp_w_BW = _fim_rows(
                window, seg_BW, np.random.default_rng([self.seed, self.split_id, step, _FIM_STREAM]), cfg.fim_rate)
            pos_BW = segment_positions(seg_BW)
            extra = {"hlp_targets": hlp_t_BW[:, :-1], "hlp_weights": hlp_w_BW[:, :-1]}
        if cfg.pose.target_length and self.split_id == SPLITS["train"]:
            rng = np.random.default_rng([self.seed, self.split_id, step, _POSE_STREAM])
            skip_BT = np.stack([pose_positions(rng, T, cfg.pose.target_length, cfg.pose.chunks) for _ in range(B)])
            pos_BW = _pose_in_segments(skip_BT, seg_BW[:, :-1])
            pos_BW = np.concatenate([pos_BW, pos_BW[:, -1:] + 1], axis=1)  # only [:, :-1] is returned
        weights = (seg_BW[:, 1:] == seg_BW[:, :-1]) if cfg.pack_documents else np.ones((B, T), bool)
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "positions": np.ascontiguousarray(pos_BW[:, :-1]),
            "segment_ids": seg_BW[:, :-1],
            "weights": weights.astype(np.float32),
            **extra,
        }


# ---- PoSE (Zhu et al., 2023, §3.2) ----------------------------------------------------------------

def pose_positions(rng: np.random.Generator, window: int, target: int, chunks: int = 2) -> np.ndarray:
    """Position ids int32 [window] for one PoSE sample: the window split at random into `chunks`
    pieces; chunk i's ids are its indices plus a skip u_i, u_0 = 0 and u_i ~ U{u_(i-1), ...,
    target - window}, so ids rise by 1 inside a chunk, never decrease, and stay in [0, target)."""
    assert target >= window >= chunks >= 1, (target, window, chunks)
    cuts = np.sort(rng.choice(np.arange(1, window), size=chunks - 1, replace=False)) if chunks > 1 else []
    bounds = np.concatenate([[0], cuts, [window]]).astype(np.int64)
    skips = [0]
    for _ in range(chunks - 1):
        skips.append(int(rng.integers(skips[-1], target - window + 1)))
    skip_T = np.repeat(np.array(skips, np.int64), np.diff(bounds))
    return (np.arange(window) + skip_T).astype(np.int32)


def _segment_starts(seg_BT: np.ndarray) -> np.ndarray:
    """Index of the first token of each token's segment run in its row, [B, T]."""
    B, T = seg_BT.shape
    new = np.ones((B, T), bool)
    new[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
    idx = np.where(new, np.arange(T)[None, :], 0)
    return np.maximum.accumulate(idx, axis=1)


def segment_positions(seg_BW: np.ndarray) -> np.ndarray:
    """Each token's index from the first token of its segment run in the row, int32 [B, W]."""
    return (np.arange(seg_BW.shape[1])[None, :] - _segment_starts(seg_BW)).astype(np.int32)


def _pose_in_segments(skip_BT: np.ndarray, seg_BT: np.ndarray) -> np.ndarray:
    """PoSE ids made relative to each document's first token in the window (RoPE only sees differences)."""
    start_BT = _segment_starts(seg_BT)
    return (skip_BT - np.take_along_axis(skip_BT, start_BT, axis=1)).astype(np.int32)


# ---- Fill-in-the-middle (Bavarian et al., 2022, §3) and HLP targets (Ding et al., 2024) ------------

def fim_encode(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray) -> np.ndarray:
    """PSM order: <PRE> prefix <SUF> suffix <MID> middle <END>, int32."""
    parts = [[FIM_PREFIX], prefix, [FIM_SUFFIX], suffix, [FIM_MIDDLE], middle, [FIM_END]]
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def fim_decode(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, middle, suffix) of a PSM sample (inverse of fim_encode); DataError if malformed."""
    t = np.asarray(tokens)
    where = [np.flatnonzero(t == s) for s in FIM_SENTINELS]
    if any(len(w) != 1 for w in where) or not (where[0][0] == 0 and where[0][0] < where[1][0] < where[2][0]
                                               < where[3][0] == len(t) - 1):
        raise DataError("fim_decode: expected <PRE> prefix <SUF> suffix <MID> middle <END> with one of each sentinel")
    i_suf, i_mid, i_end = where[1][0], where[2][0], where[3][0]
    return t[1:i_suf], t[i_mid + 1:i_end], t[i_suf + 1:i_mid]


def fim_split(doc: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prefix, middle, suffix) at two cut points drawn uniformly over the document (§3)."""
    i, j = np.sort(rng.integers(0, len(doc) + 1, size=2))
    return doc[:i], doc[i:j], doc[j:]


def hlp_targets(n_prefix: int, n_middle: int, n_suffix: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizon-length targets and weights, float32 [len(fim_encode(...))], aligned with the sample as
    inputs: after reading t middle tokens (t = 0 at <MID>) the fraction still to come is (M - t) / M."""
    n = n_prefix + n_middle + n_suffix + 4
    target, weight = np.zeros(n, np.float32), np.zeros(n, np.float32)
    if n_middle:
        i_mid = n_prefix + n_suffix + 2
        t = np.arange(n_middle + 1)
        target[i_mid + t] = (n_middle - t) / n_middle
        weight[i_mid + t] = 1.0
    return target, weight


def _fim_rows(window_BW, seg_BW, rng, rate):
    """Turn each document piece of each row into a FIM sample with probability `rate`; rows are
    cut back to W tokens (a sample may run past the window's end, as in Bavarian et al.)."""
    B, W = window_BW.shape
    out = [np.zeros((B, W), np.int32), np.zeros((B, W), np.int32), np.zeros((B, W), np.float32),
           np.zeros((B, W), np.float32)]
    for b in range(B):
        toks, segs, tgts, wts = [], [], [], []
        bounds = np.flatnonzero(np.diff(seg_BW[b])) + 1
        for piece, seg in zip(np.split(window_BW[b], bounds), np.split(seg_BW[b], bounds)):
            if rng.random() < rate:
                pre, mid, suf = fim_split(piece, rng)
                piece = fim_encode(pre, mid, suf)
                tgt, wt = hlp_targets(len(pre), len(mid), len(suf))
            else:
                tgt, wt = np.zeros(len(piece), np.float32), np.zeros(len(piece), np.float32)
            toks.append(piece)
            segs.append(np.full(len(piece), seg[0], np.int32))
            tgts.append(tgt)
            wts.append(wt)
        for o, parts in zip(out, (toks, segs, tgts, wts)):
            o[b] = np.concatenate(parts)[:W]
    return tuple(out)
