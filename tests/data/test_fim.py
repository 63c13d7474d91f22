"""Fill-in-the-middle: the PSM transform round-trips, horizon-length targets match (M - t) / M
worked out by hand, and FIM batches decode back to the original document pieces."""

import numpy as np
import pytest

from horizon.config import Data, Experiment, Model, Objective
from horizon.data.batches import (
    FIM_END,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    Batches,
    fim_decode,
    fim_encode,
    fim_split,
    hlp_targets,
)
from horizon.data.store import write_store
from horizon.errors import ConfigError, DataError


def test_fim_encode_decode_round_trips_at_every_cut():
    doc = np.arange(10, 17)
    for i in range(len(doc) + 1):
        for j in range(i, len(doc) + 1):
            pre, mid, suf = doc[:i], doc[i:j], doc[j:]
            enc = fim_encode(pre, mid, suf)
            assert len(enc) == len(doc) + 4
            assert list(enc[[0, 1 + i, 2 + len(doc) - j + i]]) == [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
            p, m, s = fim_decode(enc)
            np.testing.assert_array_equal(np.concatenate([p, m, s]), doc)
            np.testing.assert_array_equal(m, mid)


def test_fim_split_pieces_concatenate_to_the_document():
    rng = np.random.default_rng(0)
    doc = np.arange(50)
    for _ in range(20):
        pre, mid, suf = fim_split(doc, rng)
        np.testing.assert_array_equal(np.concatenate([pre, mid, suf]), doc)


def test_fim_decode_rejects_a_malformed_sample():
    with pytest.raises(DataError):
        fim_decode(np.array([FIM_PREFIX, 1, FIM_MIDDLE, 2, FIM_END]))


def test_hlp_targets_are_remaining_middle_fraction_by_hand():
    # [PRE p p SUF s MID m m m END]: <MID> at index 5; after t middle tokens 3 - t of 3 remain.
    t, w = hlp_targets(n_prefix=2, n_middle=3, n_suffix=1)
    np.testing.assert_allclose(t, [0, 0, 0, 0, 0, 1, 2 / 3, 1 / 3, 0, 0], atol=1e-7)
    np.testing.assert_array_equal(w, [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    t0, w0 = hlp_targets(n_prefix=2, n_middle=0, n_suffix=2)
    assert not w0.any() and not t0.any()


def test_fim_batches_decode_back_to_the_original_pieces(tmp_path):
    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 200, size=n).astype(np.uint16) for n in rng.integers(20, 90, size=40)]
    store = write_store(tmp_path / "s", docs)
    plain = Batches(store, Data(seq_len=64, batch_size=8), split="train", seed=0)
    fim = Batches(store, Data(seq_len=64, batch_size=8, fim_rate=1.0), split="train", seed=0)
    text = plain.split.tokens
    n_checked = 0
    for step in range(3):
        a, b = plain.batch(step), fim.batch(step)
        assert set(b) == set(a) | {"hlp_targets", "hlp_weights"}
        for row in range(8):
            toks = np.concatenate([b["inputs"][row], b["targets"][row, -1:]])
            seg = np.concatenate([b["segment_ids"][row], b["segment_ids"][row, -1:]])
            pos = b["positions"][row]
            for s in np.unique(seg)[:-1]:  # the last piece may be cut off by the window
                piece = toks[seg == s]
                pre, mid, suf = fim_decode(piece)
                orig = np.concatenate([pre, mid, suf])
                # the original piece is a contiguous run of the split's token stream
                hits = [i for i in range(len(text) - len(orig) + 1) if text[i] == orig[0]
                        and np.array_equal(text[i:i + len(orig)], orig)]
                assert hits
                assert np.array_equal(pos[seg[:-1] == s], np.arange(np.count_nonzero(seg[:-1] == s)))
                n_checked += 1
            hw = b["hlp_weights"][row]
            assert np.all(b["inputs"][row][hw > 0][:1] == FIM_MIDDLE) or not hw.any()
    assert n_checked > 5


def test_hlp_without_fim_samples_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.objective\.hlp_weight.*data\.fim_rate"):
        Experiment(model=Model(objective=Objective(hlp_weight=1.0)))
