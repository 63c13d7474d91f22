"""experiments.ssm_recall: the MQAR generator against a brute-force reading of Zoology's definition
(App. E), and a tiny end-to-end run: the report has every model x variant x cell, the three models'
parameter counts (counted independently here from their configs) agree with the report and lie
within the stated tolerance, and LongMamba rows exist exactly for the models with an SSM layer.
Accuracies are not checked (two steps learn nothing)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from horizon.errors import HorizonError


def _independent_param_count(model_cfg) -> int:
    from horizon.models.lm import LM

    abstract = nnx.eval_shape(lambda: LM(model_cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _brute_force_answers(tokens, keys: range, values: range) -> dict[int, int]:
    """{position: value} by scanning the row: a key token seen earlier as k_i v_i (a key directly
    followed by a value) asks for that value wherever it recurs."""
    answers, seen = {}, {}
    for p, tok in enumerate(tokens):
        if tok in keys:
            if tok in seen:
                answers[p] = seen[tok]
            elif p + 1 < len(tokens) and tokens[p + 1] in values:
                seen[tok] = int(tokens[p + 1])
    return answers


@pytest.mark.parametrize("T,pairs", [(24, 8), (64, [4, 8, 16, 21]), (128, 40)])
def test_mqar_rows_match_a_brute_force_definition(T, pairs):
    from experiments import ssm_recall as sr

    n_rows = 4
    rows = sr.mqar_rows(np.random.default_rng(T), n_rows, T, pairs)
    keys = range(sr.KEY_BASE, sr.KEY_BASE + sr.VOCAB)
    values = range(sr.VALUE_BASE, sr.VALUE_BASE + sr.VOCAB)
    assert not set(keys) & set(values) and sr.FILLER not in keys and sr.FILLER not in values
    for name in ("inputs", "targets", "positions", "segment_ids", "weights"):
        assert rows[name].shape == (n_rows, T), name
    assert (rows["positions"] == np.arange(T)).all() and (rows["segment_ids"] == 0).all()
    for r, N in enumerate(np.broadcast_to(pairs, (n_rows,))):
        tokens = rows["inputs"][r].tolist()
        answers = _brute_force_answers(tokens, keys, values)
        assert len(answers) == N  # every key asked exactly once
        assert sorted(answers) == np.flatnonzero(rows["weights"][r]).tolist()  # weight exactly there
        assert all(rows["weights"][r][p] == 1.0 and rows["targets"][r][p] == v for p, v in answers.items())
        # N distinct keys each paired once in the first 2N tokens; the rest is filler and query keys.
        assert len(set(tokens[0:2 * N:2])) == N and all(t in values for t in tokens[1:2 * N:2])
        assert all(t == sr.FILLER or t in keys for t in tokens[2 * N:])
        assert min(answers) >= 2 * N


def test_mqar_batches_are_a_pure_function_of_seed_and_step():
    from experiments import ssm_recall as sr
    from horizon.config import Data

    cfg = Data(seq_len=64, batch_size=8)
    a, b = sr.MQARBatches(cfg, seed=3), sr.MQARBatches(cfg, seed=3)
    for k, v in a.batch(5).items():
        assert np.array_equal(v, b.batch(5)[k])
    assert not np.array_equal(a.batch(5)["inputs"], a.batch(6)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], sr.MQARBatches(cfg, seed=4).batch(5)["inputs"])
    n_answers = a.batch(0)["weights"].sum(1)
    assert set(n_answers.astype(int).tolist()) <= set(sr.PAIRS)


@pytest.mark.parametrize("T,pairs", [(20, 7), (256, 65), (16, 0)])
def test_mqar_rows_reject_pairs_that_do_not_fit(T, pairs):
    from experiments import ssm_recall as sr

    with pytest.raises(HorizonError, match="pairs"):
        sr.mqar_rows(np.random.default_rng(0), 2, T, pairs)


@pytest.mark.slow
def test_ssm_recall_report_structure_and_matched_parameter_counts(tmp_path, monkeypatch):
    from experiments import ssm_recall as sr
    from horizon.config import SSM

    base = sr.CONFIG
    cfg = dataclasses.replace(
        base, run_dir=str(tmp_path),
        model=dataclasses.replace(base.model, d_model=32, n_layers=2, n_heads=2,
                                  ssm=SSM(state_size=8, head_dim=8, expand=1, chunk=16)),
        data=dataclasses.replace(base.data, seq_len=32, batch_size=4),
        train=dataclasses.replace(base.train, steps=2, log_every=1, eval_batches=1))
    monkeypatch.setattr(sr, "EVAL_ROWS", 2)  # structure only
    monkeypatch.setattr(sr, "PAIRS", (2, 4))  # lengths 32 | 64: two compilations per model
    monkeypatch.setattr(sr, "EXTRAPOLATION", (2,))
    out = sr.run(cfg, log=lambda *_: None)

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["params"] == out["params"]
    cells = {(c["length"], c["pairs"]) for c in result["cells"]}
    assert cells == {(32, 2), (32, 4), (64, 4), (64, 8)}
    names = {f"L={L} N={n}" for L, n in cells}
    assert set(result["accuracy"]) == set(sr.MODELS)
    for name, pattern in sr.MODELS.items():
        mcfg = dataclasses.replace(cfg.model, layer_pattern=pattern)
        assert result["params"][name] == _independent_param_count(mcfg)
        variants = {"plain", "longmamba"} if "ssd" in mcfg.mixers else {"plain"}
        assert set(result["accuracy"][name]) == variants
        for v in variants:
            by_cell = result["accuracy"][name][v]
            assert set(by_cell) == names and all(0.0 <= a <= 1.0 for a in by_cell.values())
    counts = list(result["params"].values())
    mean = sum(counts) / len(counts)
    assert max(abs(c - mean) / mean for c in counts) <= sr.PARAM_TOLERANCE, result["params"]
    assert set(result["claims"]) and all(isinstance(v, bool) for v in result["claims"].values())
    report = (tmp_path / "report.md").read_text()
    assert "Claim" in report and "| claim | held at this scale |" in report and "Wall time" in report
    for png in ("mqar_pairs.png", "mqar_same_pairs.png", "mqar_more_pairs.png"):
        assert (tmp_path / png).stat().st_size > 0
