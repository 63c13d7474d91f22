"""experiments.sparse_zoo end to end with a shrunken config (2 training steps, a one-layer model,
two policies): the report's structure, and the FLOP fractions it measured inside the model's
forward against their definitions counted by brute force (dense = every causal tile; sinks =
the tiles holding a key in the window or among the sink tokens). Accuracies are not checked."""

import dataclasses
import json

import pytest

from experiments import sparse_zoo
from horizon.config import Data, Model, Train


def _tiles(length, block, allowed):
    """Distinct (query block, key block) pairs holding a pair (p, j), j <= p, with allowed(p, j)."""
    return len({(p // block, j // block) for p in range(length) for j in range(p + 1) if allowed(p, j)})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zoo")
    cfg = dataclasses.replace(sparse_zoo.CONFIG, model=Model(d_model=32, n_layers=1, n_heads=2),
                              data=Data(seq_len=128, batch_size=4),
                              train=Train(steps=2, log_every=1, eval_batches=1, seed=1), run_dir=str(run_dir))
    res = sparse_zoo.run(cfg, log=lambda *_: None, policies=("dense_causal", "sinks"))
    return run_dir, res


def test_report_structure(zoo):
    run_dir, res = zoo
    assert res["lengths"] == [128, 256, 512]
    assert [(r["policy"], r["length"]) for r in res["rows"]] == [
        (p, L) for p in ("dense_causal", "sinks") for L in (128, 256, 512)]
    for r in res["rows"]:
        assert 0.0 <= r["passkey"] <= r["passkey_digits"] <= 1.0 and r["loss"] > 0
        assert len(r["passkey_by_depth"]) == len(sparse_zoo.DEPTHS)
    report = (run_dir / "report.md").read_text()
    assert "Claim" in report and "| policy | length | FLOP fraction |" in report
    assert report.count("| sinks |") == 3 and "remapped" in report
    assert "StreamingLLM" in report and "tradeoff.png" in report
    assert (run_dir / "tradeoff.png").stat().st_size > 0
    assert json.loads((run_dir / "result.json").read_text())["policies"] == ["dense_causal", "sinks"]


def test_flop_fractions_match_their_brute_force_definitions(zoo):
    _, res = zoo
    T = 128
    b, w, n_sinks = sparse_zoo.eval_block(T), T // 4, 4
    assert b == 16
    for r in res["rows"]:
        L = r["length"]
        causal = _tiles(L, b, lambda p, j: True)
        if r["policy"] == "dense_causal":
            want = 1.0
        else:
            want = _tiles(L, b, lambda p, j: p - j < w or j < n_sinks) / causal
        assert r["flop_fraction"] == pytest.approx(want, rel=1e-5), (r["policy"], L)
    # The sparse policy spends less as the context grows past its window.
    sinks = [r["flop_fraction"] for r in res["rows"] if r["policy"] == "sinks"]
    assert sinks[0] > sinks[1] > sinks[2]
