"""PoSE position synthesis: ids cover the whole target range, rise by exactly one inside each chunk,
never decrease, stay below the target; batches keep their windows and only the train split skips."""

import numpy as np
import pytest

from horizon.config import Data, Pose
from horizon.data.batches import Batches, pose_positions
from horizon.data.store import write_store
from horizon.errors import ConfigError


def test_pose_positions_cover_the_target_and_rise_by_one_inside_each_chunk():
    window, target, chunks = 16, 64, 3
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        p = pose_positions(rng, window, target, chunks)
        assert p.shape == (window,) and p[0] == 0  # u_0 = 0: the first chunk keeps its start
        d = np.diff(p)
        assert np.all(d >= 1)  # increasing
        assert np.count_nonzero(d != 1) <= chunks - 1  # jumps only at chunk boundaries
        assert p.max() < target
        seen |= set(p.tolist())
    assert seen == set(range(target))


def test_pose_with_target_equal_to_window_is_plain_positions():
    p = pose_positions(np.random.default_rng(1), 32, 32, 2)
    np.testing.assert_array_equal(p, np.arange(32))


def _store(tmp_path):
    docs = [np.full(n, i % 200 + 1, np.uint16) for i, n in enumerate([300, 40, 500, 90, 250] * 4)]
    return write_store(tmp_path / "s", docs)


def test_pose_batches_keep_windows_and_skip_only_on_the_train_split(tmp_path):
    store = _store(tmp_path)
    plain_cfg = Data(seq_len=32, batch_size=6)
    pose_cfg = Data(seq_len=32, batch_size=6, pose=Pose(target_length=256, chunks=2))
    plain = Batches(store, plain_cfg, split="train", seed=0).batch(3)
    pose = Batches(store, pose_cfg, split="train", seed=0).batch(3)
    for k in ("inputs", "targets", "segment_ids", "weights"):
        np.testing.assert_array_equal(plain[k], pose[k])
    assert pose["positions"].max() > 32  # positions reach past the window
    for row in range(6):  # inside a document, ids rise; each document starts at 0 in its window
        seg, pos = pose["segment_ids"][row], pose["positions"][row]
        for s in np.unique(seg):
            p = pos[seg == s]
            assert p[0] == 0 and np.all(np.diff(p) >= 1) and p[-1] < 256
    held_plain = Batches(store, plain_cfg, split="heldout", seed=0).batch(0)
    held_pose = Batches(store, pose_cfg, split="heldout", seed=0).batch(0)
    np.testing.assert_array_equal(held_plain["positions"], held_pose["positions"])


def test_pose_target_shorter_than_window_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.pose\.target_length.*data\.seq_len"):
        Data(seq_len=256, pose=Pose(target_length=128))
