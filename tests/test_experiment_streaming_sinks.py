"""experiments.streaming_sinks: the per-position stream losses it reports equal independent
references computed with the model's plain (cache-free) forward, and a shrunken run writes a report
with every cache and policy row. The claims themselves are not checked (a few steps learn nothing)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from horizon.config import Decode, Model


def _lm(**kw):
    from horizon.models.lm import LM

    return LM(Model(d_model=32, n_heads=2, init_std=0.3, **kw), rngs=nnx.Rngs(0))


def _forward_nll(model, tokens_T, positions_T):
    """Per-token NLLs of tokens[1:] from the model's own forward over tokens[:-1] at the given
    positions (one document, no cache)."""
    x = np.asarray(tokens_T[:-1], np.int32)[None]
    pos = np.asarray(positions_T[:-1], np.int32)[None]
    logits = np.asarray(model(x, positions_BT=pos, segment_ids_BT=np.zeros_like(x)))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    return -logp[np.arange(len(x[0])), tokens_T[1:]]


def test_full_cache_stream_losses_equal_the_uncached_forward():
    from experiments.streaming_sinks import stream_losses

    model = _lm(n_layers=2)
    text = np.random.default_rng(0).integers(0, 256, 80).astype(np.int32)
    got = stream_losses(model, Decode(cache="full", cache_size=80), text, capacity=80)
    want = _forward_nll(model, text, np.arange(80))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("n_sinks", [0, 4])
def test_one_layer_ring_cache_equals_recomputing_sinks_plus_window(n_sinks):
    """One attention layer: a token's key depends on that token alone, so the ring cache's loss at
    t equals a fresh forward over [the first n_sinks tokens, the last C - n_sinks tokens up to t] at
    positions 0..C-1 (StreamingLLM's positions within the cache, Sec. 3.2)."""
    from experiments.streaming_sinks import stream_losses

    C, n = 12, 40
    model = _lm(n_layers=1)
    text = np.random.default_rng(1).integers(0, 256, n).astype(np.int32)
    got = stream_losses(model, Decode(cache="streaming", cache_size=C, n_sinks=n_sinks), text, capacity=C)
    w = C - n_sinks
    # every step's context, right-padded to one length (causal: padding after a token is unseen)
    rows = np.zeros((n - 1, C + 1), np.int32)
    last = np.zeros(n - 1, int)
    for t in range(n - 1):
        ctx = np.arange(t + 2) if t < C else np.concatenate([np.arange(n_sinks), np.arange(t - w + 1, t + 2)])
        rows[t, :len(ctx)], last[t] = text[ctx], len(ctx) - 2
    logits = np.asarray(model(rows[:, :-1], positions_BT=np.broadcast_to(np.arange(C), (n - 1, C)),
                              segment_ids_BT=np.zeros((n - 1, C), np.int32)))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    want = -logp[np.arange(n - 1), last, rows[np.arange(n - 1), last + 1]]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_shrunken_run_writes_every_cache_and_policy_row(tmp_path, monkeypatch):
    from experiments import streaming_sinks as ss
    from horizon.config import Pose

    monkeypatch.setattr(ss, "CACHE_FRACTIONS", (1.0,))  # one cache size: fewer compilations
    monkeypatch.setattr(ss, "TEXT_FACTOR", 6)
    monkeypatch.setattr(ss, "SHORT_FACTORS", ())  # passkey at the long context only
    monkeypatch.setattr(ss, "LONG_FACTOR", 4)
    base = ss.CONFIG
    cfg = dataclasses.replace(
        base, run_dir=str(tmp_path),
        model=dataclasses.replace(base.model, d_model=32, n_layers=2, n_heads=2),
        data=dataclasses.replace(base.data, seq_len=32, batch_size=4, pose=Pose(target_length=128)),
        train=dataclasses.replace(base.train, steps=2, log_every=1, eval_batches=1))
    out = ss.run(cfg, log=lambda *_: None)

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["cache_sizes"] == [32] and result["text_tokens"] == 6 * 32
    assert set(result["streaming"]) == {f"{lab} @32" for lab in ["full", *ss.STREAM_CACHES]}
    assert all(len(v) == 6 * 32 - 1 for v in result["loss_by_position"].values())
    assert result["policy_lengths"] == [128] and list(result["policies"]) == ["128"]
    pol = result["policies"]["128"]
    assert set(pol) == {"full", "tokenselect", "tidaldecode", "squeezed", "hip",
                                       f"streaming ({ss.N_SINKS} sinks)"}
    # full-cache decode and the plain forward score the same samples alike (greedy verdicts agree)
    assert result["plain_forward_accuracy"] == {"128": pol["full"]["accuracy"]}
    for row in pol.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_s"] > 0
    # KV bytes: a full cache of 2 layers x (k, v) x slots x heads x head dim float32 (+ int32 lengths)
    full_slots = -(-(128 + ss.TIMED_STEPS) // 8) * 8
    assert pol["full"]["kv_bytes"] == 2 * (2 * full_slots * 2 * 16 * 4 + 4)
    assert pol[f"streaming ({ss.N_SINKS} sinks)"]["kv_bytes"] == 2 * (2 * 32 * 2 * 16 * 4 + 4)
    # before the ring first wraps (C - n_sinks tokens: EMA sinks hold averages, not tokens) every
    # cache holds every token: the same losses as full
    lbp = result["loss_by_position"]
    for lab in ss.STREAM_CACHES:
        np.testing.assert_allclose(lbp[f"{lab} @32"][:32 - ss.N_SINKS], lbp["full"][:32 - ss.N_SINKS],
                                   rtol=1e-4, atol=1e-4)
    report = (tmp_path / "report.md").read_text()
    assert "## Decode policies at 128 tokens" in report and "window+4 sinks" in report
    assert (tmp_path / "stream_loss_32.png").stat().st_size > 0 and (tmp_path / "stream_gap_32.png").stat().st_size > 0
    assert out["claims"] == result["claims"]
