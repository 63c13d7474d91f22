"""Run synthetic tasks (horizon.eval.tasks) on a model: exact match of the greedy answer, as an
accuracy grid over lengths x the task's second axis; plus the length check that refuses positions a
model cannot represent without RoPE scaling.

Greedy decoding yields the gold answer exactly when, fed the gold prefix, the argmax at every answer
position is the gold token; so one forward over prompt + answer scores a sample (`answer_matches`),
the same verdict as decoding token by token (`greedy_decode`) up to floating-point summation order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.config import Experiment, Model
from horizon.data.tokenizer import get_tokenizer
from horizon.errors import ConfigError
from horizon.eval.tasks import Sample, Task, score


def trained_length(cfg: Experiment) -> int:
    """The longest position span the run trained on: PoSE's target length, else data.seq_len."""
    return max(cfg.data.seq_len, cfg.data.pose.target_length)


def _stretch(rope) -> float:
    """How many times longer a context the RoPE scaling is meant for (inf: dynamic, any length)."""
    if rope.scaling == "dynamic_ntk":
        return math.inf
    return 1.0 if rope.scaling == "none" else rope.factor


def representable_length(cfg: Experiment, model_cfg: Model | None = None) -> float:
    """How long a sequence `model_cfg` (default: the run's own) covers with rotations the run
    trained on: the trained length, times the RoPE factor applied beyond the one it trained with."""
    eval_stretch, train_stretch = _stretch((model_cfg or cfg.model).rope), _stretch(cfg.model.rope)
    if math.isinf(eval_stretch):
        return math.inf
    return trained_length(cfg) * eval_stretch / (1.0 if math.isinf(train_stretch) else train_stretch)


def check_length(cfg: Experiment, length: int, *, model_cfg: Model | None = None,
                 allow_extrapolation: bool = False) -> None:
    """ConfigError if `length` needs positions the model never saw and no scaling covers them."""
    limit = representable_length(cfg, model_cfg)
    if length > limit and not allow_extrapolation:
        trained = trained_length(cfg)
        raise ConfigError(
            f"--lengths: {length} exceeds the {limit:g} positions this model represents (trained at {trained}); "
            f"scale RoPE (--rope-scaling yarn --rope-factor {math.ceil(length / trained)}, i.e. model.rope), "
            "or pass --allow-extrapolation to measure it unscaled")
    mcfg = model_cfg or cfg.model
    if mcfg.attention.policy != "dense_causal" and length % mcfg.attention.block:
        raise ConfigError(f"--lengths: {length} is not a multiple of the attention block {mcfg.attention.block} "
                          f"that policy {mcfg.attention.policy!r} needs; pick multiples of it")


def logits_fn(model):
    """(tokens [B, T], positions [B, T] | None, segment_ids [B, T] | None) -> logits float32 [B, T, V]
    (numpy), one jitted forward per shape; None means positions 0..T-1 and one document."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, tokens_BT, positions_BT, segment_ids_BT):
        return nnx.merge(graphdef, params)(tokens_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)

    def forward(tokens, positions=None, segment_ids=None):
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)) if positions is None else positions
        segment_ids = np.zeros((B, T), np.int32) if segment_ids is None else segment_ids
        return np.asarray(run(params, *(jnp.asarray(a, jnp.int32) for a in (tokens, positions, segment_ids))))

    return forward


def argmax_fn(model, forward=None):
    """tokens int [B, T] -> the model's argmax next token at every position, int32 [B, T] (numpy);
    `forward`: a logits_fn(model) to share its compilations."""
    forward = forward or logits_fn(model)
    return lambda tokens: forward(tokens).argmax(-1).astype(np.int32)


def answer_matches(argmax, samples: list[Sample], *, batch_size: int = 8) -> tuple[list[float], list[str]]:
    """(score per sample, the greedy answer line as far as it agrees with the gold one plus its
    first differing byte), with `argmax = argmax_fn(model)`. All samples must have one length."""
    tok = get_tokenizer()
    scores, preds = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        rows = np.stack([tok.encode(s.text).astype(np.int32) for s in chunk])
        pad = batch_size - len(rows)  # a fixed batch shape compiles once
        ids = argmax(np.concatenate([rows, np.repeat(rows[:1], pad, 0)]) if pad else rows)
        for s, row, pred in zip(chunk, rows, ids):
            P = len(s.prompt)
            got = pred[P - 1:len(row) - 1]  # argmax at the positions that predict answer + "\n"
            want = row[P:]
            wrong = np.flatnonzero(got != want)
            upto = len(want) if len(wrong) == 0 else wrong[0] + 1
            text = tok.decode(got[:upto])
            preds.append(text)
            scores.append(score(s, text))
    return scores, preds


def greedy_decode(model, prompts: list[np.ndarray], *, max_new_tokens: int, stop_token: int | None = None,
                  batch_size: int = 8) -> list[np.ndarray]:
    """Greedy continuations (int32, without the prompt, cut after `stop_token`) of token prompts of any
    lengths, through horizon.infer's cached decoder (one prefill, then a lax.while_loop). Every batch
    is padded to the longest prompt and to `batch_size` rows, so one compilation serves them all."""
    from horizon.config import Decode
    from horizon.infer.generate import Decoder

    decoder = Decoder(model, Decode(max_new_tokens=max_new_tokens,
                                    stop_tokens=() if stop_token is None else (int(stop_token),)))
    P = max(len(p) for p in prompts)
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # filler rows, dropped below
        toks = np.zeros((batch_size, P), np.int32)
        for b, p in enumerate(rows):
            toks[b, :len(p)] = p
        lens = np.array([len(p) for p in rows], np.int32)
        tokens = decoder(toks, lens).tokens  # -1 after a row's stop token
        outs += [row[row >= 0].astype(np.int32) for row in tokens[:len(chunk)]]
    return outs


def evaluate_task(model, task: Task, lengths, xs=None, *, n_samples: int = 8, seed: int = 0,
                  batch_size: int = 8, argmax=None) -> dict:
    """Accuracy of `model` on `task` for each length x axis value: n_samples seeded samples per cell
    (`argmax`: a ready argmax_fn(model), to share its compilations between calls).

    Returns {"task", "axis", "lengths", "xs", "accuracy": [len(lengths)][len(xs)], "samples": [...]}.
    """
    xs = tuple(task.default_xs if xs is None else xs)
    argmax = argmax or argmax_fn(model)
    acc, records = [], []
    for L in lengths:
        row = []
        for x in xs:
            samples = [task.generate(seed * 100_003 + i, int(L), x) for i in range(n_samples)]
            scores, preds = answer_matches(argmax, samples, batch_size=batch_size)
            row.append(float(np.mean(scores)))
            records += [{"length": int(L), "x": float(x), "seed": s.seed, "answer": s.answer, "pred": p,
                         "score": sc} for s, p, sc in zip(samples, preds, scores)]
        acc.append(row)
    return {"task": task.name, "axis": task.axis, "lengths": [int(L) for L in lengths], "xs": [float(x) for x in xs],
            "accuracy": acc, "samples": records}
