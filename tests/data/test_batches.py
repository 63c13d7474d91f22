"""Batches are a pure function of (seed, step); the held-out split shares no document with training;
segment ids, positions and weights agree with a brute-force reading of the window."""

import numpy as np

from horizon.config import Data
from horizon.data.batches import Batches, split_documents
from horizon.data.store import write_store


def _store(tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.full(n, i % 250 + 1, np.uint16) for i, n in enumerate(rng.integers(3, 40, size=60))]
    return write_store(tmp_path / "s", docs)


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    store = _store(tmp_path)
    cfg = Data(seq_len=16, batch_size=4)
    a = Batches(store, cfg, split="train", seed=3)
    b = Batches(store, cfg, split="train", seed=3)
    for step in (0, 5, 5, 0):
        for k, v in a.batch(step).items():
            np.testing.assert_array_equal(v, b.batch(step)[k])
    assert not np.array_equal(a.batch(1)["inputs"], a.batch(2)["inputs"])
    assert not np.array_equal(a.batch(1)["inputs"], Batches(store, cfg, split="train", seed=4).batch(1)["inputs"])


def test_heldout_never_overlaps_training_documents(tmp_path):
    store = _store(tmp_path)
    splits = split_documents(store, 0.2)
    assert not set(splits["train"]) & set(splits["heldout"])
    assert set(splits["train"]) | set(splits["heldout"]) == set(range(store.n_docs))
    # Each document is a constant token = its id, so a window's tokens name its documents.
    held_tokens = {int(store.document(i)[0]) for i in splits["heldout"]}
    train_tokens = {int(store.document(i)[0]) for i in splits["train"]}
    cfg = Data(seq_len=16, batch_size=8, heldout_fraction=0.2)
    seen = set()
    for step in range(20):
        seen |= set(np.unique(Batches(store, cfg, split="heldout", seed=0).batch(step)["inputs"]).tolist())
    assert seen <= held_tokens and not seen & (train_tokens - held_tokens)


def test_segments_positions_and_weights_match_brute_force(tmp_path):
    store = _store(tmp_path)
    cfg = Data(seq_len=24, batch_size=6)
    bt = Batches(store, cfg, split="train", seed=0)
    sp = bt.split
    doc_of = np.repeat(np.arange(len(sp.starts) - 1), np.diff(sp.starts))
    for step in range(5):
        b = bt.batch(step)
        for row in range(cfg.batch_size):
            # find the window start by matching tokens against the split stream
            tokens = np.concatenate([b["inputs"][row], b["targets"][row, -1:]])
            rng = np.random.default_rng([0, 0, step])
            start = rng.integers(0, len(sp.tokens) - cfg.seq_len, size=cfg.batch_size)[row]
            np.testing.assert_array_equal(tokens, sp.tokens[start:start + cfg.seq_len + 1])
            docs = doc_of[start:start + cfg.seq_len + 1]
            seg, pos = [], []
            for t, d in enumerate(docs):
                seg.append(d - docs[0])
                pos.append(t - next(u for u in range(t + 1) if docs[u] == d))
            np.testing.assert_array_equal(b["segment_ids"][row], seg[:-1])
            np.testing.assert_array_equal(b["positions"][row], pos[:-1])
            np.testing.assert_array_equal(b["weights"][row], [float(docs[t] == docs[t + 1]) for t in range(cfg.seq_len)])
