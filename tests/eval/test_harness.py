"""The evaluation harness: one teacher-forced forward gives the same tokens as greedy decoding; the
exact-match verdict reads the right positions; the loss-by-position curve equals a brute-force
per-token computation bucketed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.config import Data, Model
from horizon.data.batches import Batches
from horizon.data.store import write_store
from horizon.data.tokenizer import get_tokenizer
from horizon.eval.harness import answer_matches, argmax_fn, evaluate_task, greedy_decode
from horizon.eval.perplexity import loss_by_position
from horizon.eval.tasks import get_task
from horizon.models.heads import token_cross_entropy
from horizon.models.lm import LM

MODEL = Model(d_model=32, n_layers=2, n_heads=2, init_std=0.3)  # peaky logits: no argmax ties


def test_teacher_forced_argmax_along_the_greedy_continuation_reproduces_it():
    model = LM(MODEL, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).astype(np.int32) for n in (9, 14, 4)]
    outs = greedy_decode(model, prompts, max_new_tokens=6, batch_size=3)
    W = 14 + 6
    rows = np.zeros((3, W), np.int32)  # prompt + its greedy continuation, left-aligned like the decoder's buffer
    for r, (p, g) in enumerate(zip(prompts, outs)):
        assert len(g) == 6
        rows[r, :len(p) + 6] = np.concatenate([p, g])
    ids = argmax_fn(model)(rows)
    for r, (p, g) in enumerate(zip(prompts, outs)):
        np.testing.assert_array_equal(ids[r, len(p) - 1:len(p) + 5], g)


def test_answer_matches_reads_the_answer_positions():
    tok = get_tokenizer()
    samples = [get_task("passkey").generate(s, 160, 0.5) for s in range(3)]

    def oracle(rows, corrupt=None):  # predicts every next token correctly, except where told
        out = np.concatenate([rows[:, 1:], rows[:, :1]], axis=1)
        if corrupt is not None:
            out[:, corrupt] = ord("x")
        return out

    scores, preds = answer_matches(oracle, samples, batch_size=2)
    assert scores == [1.0, 1.0, 1.0] and preds == [s.answer + "\n" for s in samples]
    P = len(samples[0].prompt)
    scores, preds = answer_matches(lambda r: oracle(r, corrupt=P + 1), samples, batch_size=4)  # 3rd digit
    assert scores == [0.0, 0.0, 0.0] and preds == [s.answer[:2] + "x" for s in samples]
    scores, _ = answer_matches(lambda r: oracle(r, corrupt=P - 2 + len(tok.encode(samples[0].answer)) + 1),
                               samples, batch_size=4)  # the closing newline is part of the verdict
    assert scores == [0.0, 0.0, 0.0]


def test_evaluate_task_fills_the_grid():
    res = evaluate_task(LM(MODEL, rngs=nnx.Rngs(1)), get_task("passkey"), [96, 128], [0.2, 0.8], n_samples=3,
                        batch_size=4)
    assert res["lengths"] == [96, 128] and res["xs"] == [0.2, 0.8]
    assert len(res["samples"]) == 12
    for i, L in enumerate(res["lengths"]):
        for j, x in enumerate(res["xs"]):
            cell = [r["score"] for r in res["samples"] if r["length"] == L and r["x"] == x]
            assert res["accuracy"][i][j] == np.mean(cell)


def test_loss_by_position_equals_brute_force_buckets(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=n).astype(np.uint16) for n in (70, 20, 130, 45, 90, 60)]
    store = write_store(tmp_path / "s", docs)
    batches = Batches(store, Data(seq_len=48, batch_size=3, heldout_fraction=0.5), split="heldout", seed=0)
    model = LM(MODEL, rngs=nnx.Rngs(2))
    got = loss_by_position(model, batches, n_batches=2, bucket=10)
    graphdef, params = nnx.split(model)
    per_token = jax.jit(lambda p, x, pos, seg, y: token_cross_entropy(
        nnx.merge(graphdef, p)(x, positions_BT=pos, segment_ids_BT=seg), y))
    sums, counts = {}, {}
    for i in range(2):
        b = batches.batch(i)
        ce = np.asarray(per_token(params, *(jnp.asarray(b[k]) for k in ("inputs", "positions", "segment_ids",
                                                                         "targets"))))
        for r in range(3):
            for t in range(48):
                if b["weights"][r, t] > 0:
                    k = int(b["positions"][r, t]) // 10 * 10
                    sums[k] = sums.get(k, 0.0) + float(ce[r, t])
                    counts[k] = counts.get(k, 0) + 1
    assert got["bucket_start"] == sorted(counts)
    assert got["count"] == [counts[k] for k in sorted(counts)]
    np.testing.assert_allclose(got["loss"], [sums[k] / counts[k] for k in sorted(counts)], rtol=1e-5)
