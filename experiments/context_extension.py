"""Context extension: a byte LM trained at length T on the stdlib corpus mixed with synthetic
retrieval (passkey, needle-in-a-haystack), then run at 4T and 8T by (a) nothing, (b) position
interpolation (Chen et al., 2023), (c) NTK-aware scaling, (d) YaRN (Peng et al., 2023), (e) a short
PoSE fine-tune (Zhu et al., 2023) with interpolation, (f) ProLong-style large theta plus a short
fine-tune at 4T (Gao et al., 2024).

Knobs: data.seq-len is T; train.steps the base run (fine-tunes take a tenth of it, at equal
tokens); train.eval-batches the samples per (task, length, depth) cell.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments._fit import fit, params_of, run_dir_for
from horizon.config import Data, Experiment, Model, Optim, Pose, Rope, Train
from horizon.data.batches import Batches, pose_positions, segment_positions
from horizon.data.corpus import load_store
from horizon.data.tokenizer import get_tokenizer
from horizon.eval.harness import argmax_fn, check_length, evaluate_task, logits_fn
from horizon.eval.perplexity import loss_by_position
from horizon.eval.report import markdown_table, plot_curves, plot_heatmap, write_json
from horizon.eval.tasks import NOISE, TASKS
from horizon.models.lm import with_config

CONFIG = Experiment(
    name="context_extension",
    claim="past the training length plain RoPE fails at retrieval; RoPE scaling (PI, NTK, YaRN) and short "
          "PoSE or large-theta fine-tunes recover it",
    model=Model(d_model=128, n_layers=2, n_heads=4),
    data=Data(seq_len=128, batch_size=16),
    optim=Optim(lr=2e-3, warmup_steps=30),
    train=Train(steps=1600, log_every=100, eval_batches=4),
)

TASK_NAMES = ("passkey", "niah_single")
DEPTHS = (0.1, 0.5, 0.9)
RETRIEVAL_FRACTION = 0.375  # rows of each training batch that are retrieval samples
INDUCTION_FRACTION = 0.375  # rows that are repeated random strings; the rest is the corpus
ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8).astype(np.int32)  # induction rows
FINE_TUNE_MIX = {"retrieval": 0.5, "induction": 0.0}  # fine-tunes: half retrieval, half (long) corpus
MIN_SAMPLE = 128  # bytes: the shortest synthetic sample (both tasks fit)
ANSWER_WEIGHT = 4.0  # loss weight of answer tokens in synthetic rows
PROLONG_THETA_SCALE = 16  # ProLong raised the base 16x (5e5 -> 8e6) for an 8x longer context
VARIANTS = ("none", "pi", "ntk", "yarn", "pose", "prolong")


class RetrievalMixture:
    """`batch(step)`: corpus windows (horizon.data.batches) with leading rows replaced by synthetic
    ones: retrieval rows pack passkey / needle samples of random lengths up to T + 1 as separate
    documents (answer tokens weigh ANSWER_WEIGHT; with PoSE a row is one full-length sample under
    PoSE ids), and induction rows repeat a random string of letters and digits with a random
    period, the classic curriculum that makes a small model form the copying (induction) heads
    retrieval relies on (Olsson et al., 2022)."""

    def __init__(self, store, data: Data, *, seed: int, retrieval: float = RETRIEVAL_FRACTION,
                 induction: float = INDUCTION_FRACTION, tasks: tuple[str, ...] = TASK_NAMES):
        self.tasks = tasks
        self.corpus = Batches(store, data, split="train", seed=seed)
        self.data, self.seed = data, seed
        self.n_retrieval = max(1, round(retrieval * data.batch_size))
        self.n_induction = min(data.batch_size - self.n_retrieval, round(induction * data.batch_size))
        self.tok = get_tokenizer()

    def _retrieval_row(self, rng, length: int):
        """tokens, segment ids, answer mask of `length` bytes packed with samples."""
        toks, segs, ans = [], [], []
        left, seg = length, 0
        while left > 0:
            task = TASKS[self.tasks[int(rng.integers(len(self.tasks)))]]
            lo = MIN_SAMPLE
            n = left if left < 2 * lo or self.data.pose.target_length else int(rng.integers(lo, left + 1))
            a = np.zeros(n, bool)
            if n < lo:  # a tail too short for a sample: plain filler, its own document
                t = self.tok.encode((NOISE * (n // len(NOISE) + 1))[:n]).astype(np.int32)
            else:
                s = task.generate(int(rng.integers(2**31)), n, float(rng.random()))
                t = self.tok.encode(s.text).astype(np.int32)
                a[len(s.prompt):] = True
            toks.append(t)
            segs.append(np.full(n, seg, np.int32))
            ans.append(a)
            left, seg = left - n, seg + 1
        return np.concatenate(toks), np.concatenate(segs), np.concatenate(ans)

    def batch(self, step: int) -> dict:
        b = {k: v.copy() for k, v in self.corpus.batch(step).items()}
        T = self.data.seq_len
        rng = np.random.default_rng([self.seed, 0xC0DE, step])
        for r in range(self.n_retrieval):
            toks, seg, ans = self._retrieval_row(rng, T + 1)
            b["inputs"][r], b["targets"][r] = toks[:-1], toks[1:]
            b["segment_ids"][r] = seg[:-1]
            b["weights"][r] = np.where(seg[1:] == seg[:-1], np.where(ans[1:], ANSWER_WEIGHT, 1.0), 0.0)
            if self.data.pose.target_length:
                b["positions"][r] = pose_positions(rng, T, self.data.pose.target_length, self.data.pose.chunks)
            else:
                b["positions"][r] = segment_positions(seg[None, :-1])[0]
        for r in range(self.n_retrieval, self.n_retrieval + self.n_induction):
            period = int(rng.integers(16, max(17, T // 2)))
            # digits included: the copy must work for the bytes the answers use
            row = np.tile(ALPHABET[rng.integers(len(ALPHABET), size=period)], T // period + 2)[:T + 1]
            b["inputs"][r], b["targets"][r] = row[:-1], row[1:]
            b["segment_ids"][r], b["weights"][r] = 0, (np.arange(T) >= period).astype(np.float32)
            b["positions"][r] = (pose_positions(rng, T, self.data.pose.target_length, self.data.pose.chunks)
                                 if self.data.pose.target_length else np.arange(T))
        return b


def _scaled(model, cfg: Experiment, kind: str, factor: float):
    if kind == "none" or factor <= 1:
        return model
    return with_config(model, dataclasses.replace(cfg.model, rope=Rope(
        scaling={"pi": "linear"}.get(kind, kind), factor=factor, original_length=cfg.data.seq_len)))


def run(cfg: Experiment = CONFIG, *, log=print) -> dict:
    t0 = time.perf_counter()
    run_dir = run_dir_for(cfg)
    T, B, seed = cfg.data.seq_len, cfg.data.batch_size, cfg.train.seed
    lengths = (T, 4 * T, 8 * T)
    ft_steps = max(1, cfg.train.steps // 10)
    store = load_store(cfg.data.store)

    log(f"base: {cfg.train.steps} steps at T={T}")
    base, base_losses = fit(cfg, RetrievalMixture(store, cfg.data, seed=seed), log=log)

    # (e) PoSE: windows of T whose positions cover 8T, with 8x position interpolation (as in PoSE's runs).
    pose_data = dataclasses.replace(cfg.data, pose=Pose(target_length=8 * T))
    ft_optim = dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 3, schedule="constant", warmup_steps=min(10, ft_steps))
    pose_cfg = dataclasses.replace(
        cfg, data=pose_data, optim=ft_optim, train=dataclasses.replace(cfg.train, steps=ft_steps),
        model=dataclasses.replace(cfg.model, rope=Rope(scaling="linear", factor=8, original_length=T)))
    log(f"pose fine-tune: {ft_steps} steps, positions to {8 * T}")
    pose_model, _ = fit(pose_cfg, RetrievalMixture(store, pose_data, seed=seed + 1, **FINE_TUNE_MIX),
                        params=params_of(base), log=log)

    # (f) ProLong: base theta x16 and a fine-tune at 4T, same tokens per step.
    long_data = dataclasses.replace(cfg.data, seq_len=4 * T, batch_size=max(1, B // 4))
    prolong_cfg = dataclasses.replace(
        cfg, data=long_data, optim=ft_optim, train=dataclasses.replace(cfg.train, steps=ft_steps),
        model=dataclasses.replace(cfg.model, rope_theta=cfg.model.rope_theta * PROLONG_THETA_SCALE))
    log(f"prolong fine-tune: {ft_steps} steps at {4 * T}, theta {prolong_cfg.model.rope_theta:g}")
    prolong_model, _ = fit(prolong_cfg, RetrievalMixture(store, long_data, seed=seed + 2, **FINE_TUNE_MIX),
                           params=params_of(base), log=log)

    forwards = {}  # one compiled forward per distinct model, shared by every length and task

    def model_at(variant: str, L: int):
        if variant == "pose":
            model, vcfg = pose_model, pose_cfg
        elif variant == "prolong":
            model, vcfg = prolong_model, prolong_cfg
        else:
            key = (variant, L) if variant != "none" and L > T else ("none", T)
            if key not in forwards:
                model = _scaled(base, cfg, variant, L / T)
                forwards[key] = (model, logits_fn(model))
            model, vcfg = forwards[key][0], cfg
            return model, vcfg, forwards[key][1]
        if variant not in forwards:
            forwards[variant] = (model, logits_fn(model))
        return model, vcfg, forwards[variant][1]

    n, EB = cfg.train.eval_batches, 8  # EB: evaluation batch, the same for tasks and loss (one compile)
    acc = {v: {t: {} for t in TASK_NAMES} for v in VARIANTS}
    grids, curves = {}, {}
    held = dataclasses.replace(cfg.data, seq_len=8 * T, batch_size=EB, pose=Pose(), fim_rate=0.0)
    held_batches = Batches(store, held, split="heldout", seed=seed)
    for v in VARIANTS:
        for L in lengths:
            model, vcfg, forward = model_at(v, L)
            check_length(vcfg, L, model_cfg=model.cfg, allow_extrapolation=v in ("none", "prolong"))
            for t in TASK_NAMES:
                res = evaluate_task(model, TASKS[t], [L], DEPTHS, n_samples=n, seed=seed + 1, batch_size=EB,
                                    argmax=argmax_fn(model, forward))
                acc[v][t][L] = float(np.mean(res["accuracy"][0]))
                grids.setdefault((v, t), []).append(res["accuracy"][0])
        model, _, forward = model_at(v, 8 * T)
        curves[v] = loss_by_position(model, held_batches, n_batches=1, bucket=max(1, T // 2), forward=forward)
        log(f"{v}: " + ", ".join(f"{t} {[round(acc[v][t][L], 2) for L in lengths]}" for t in TASK_NAMES))

    # ---- report ------------------------------------------------------------------------------------
    def loss_at(v, lo, hi):
        c = curves[v]
        xs = [(s, lv, k) for s, lv, k in zip(c["bucket_start"], c["loss"], c["count"]) if lo <= s < hi]
        return sum(lv * k for _, lv, k in xs) / max(1, sum(k for *_, k in xs))

    rows = [[v, *[acc[v][t][L] for t in TASK_NAMES for L in lengths], loss_at(v, 0, T), loss_at(v, T, 8 * T)]
            for v in VARIANTS]
    headers = ["variant", *[f"{t} @{L}" for t in TASK_NAMES for L in lengths], f"loss pos<{T}", f"loss pos>={T}"]
    for t in TASK_NAMES:
        plot_heatmap(run_dir / f"{t}_by_variant.png", [[acc[v][t][L] for L in lengths] for v in VARIANTS],
                     row_labels=VARIANTS, col_labels=lengths, xlabel="length", ylabel="variant",
                     title=f"{t} accuracy (mean over depths)")
    for v in VARIANTS:
        plot_heatmap(run_dir / f"passkey_{v}.png", grids[(v, "passkey")], row_labels=lengths, col_labels=DEPTHS,
                     xlabel="depth", ylabel="length", title=f"passkey, {v}")
    plot_curves(run_dir / "loss_by_position.png", {v: (c["bucket_start"], c["loss"]) for v, c in curves.items()},
                xlabel="position", ylabel="held-out loss (nats)", title=f"loss by position at {8 * T} (trained at {T})")
    long = 8 * T
    best_ext = max(acc[v]["passkey"][long] for v in VARIANTS if v != "none")
    claims = {
        "base retrieves at the training length": acc["none"]["passkey"][T] >= 0.5,
        "plain RoPE fails beyond it": acc["none"]["passkey"][long] < max(0.5, acc["none"]["passkey"][T] - 0.25),
        "some extension method retrieves at 8T better than none": best_ext > acc["none"]["passkey"][long],
        "PoSE or ProLong fine-tune beats training-free PI at 8T":
            max(acc["pose"]["passkey"][long], acc["prolong"]["passkey"][long]) > acc["pi"]["passkey"][long],
        "unscaled loss rises past the training length": loss_at("none", T, 8 * T) > loss_at("none", 0, T) + 0.1,
        "NTK or YaRN keeps the loss past T below unscaled":
            min(loss_at("ntk", T, 8 * T), loss_at("yarn", T, 8 * T)) < loss_at("none", T, 8 * T),
    }
    result = {"lengths": list(lengths), "accuracy": {v: {t: {str(L): a for L, a in d.items()} for t, d in tv.items()}
                                                     for v, tv in acc.items()},
              "loss_by_position": curves, "claims": claims, "base_losses": base_losses,
              "seconds": time.perf_counter() - t0}
    table = markdown_table(headers, rows)
    report = [f"# {cfg.name}", "", f"Claim: {cfg.claim}.", "",
              (f"Base: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, trained {cfg.train.steps} steps at "
              f"T = {T} ({RETRIEVAL_FRACTION:.0%} of rows passkey / needle samples, {INDUCTION_FRACTION:.0%} repeated "
              f"random strings, the rest corpus); fine-tunes "
              f"{ft_steps} steps. Accuracy = exact match of the greedy answer, {n} samples x {len(DEPTHS)} depths "
              "per cell. Loss columns: held-out corpus loss (nats) by within-document position at length "
              f"{8 * T}."), "", table, "",
              "| claim | held at this scale |", "|---|---|", *[f"| {k} | {'yes' if ok else 'no'} |"
                                                           for k, ok in claims.items()], "",
              *[f"![{t}]({t}_by_variant.png)" for t in TASK_NAMES], "", "![loss](loss_by_position.png)", "",
              *[f"![passkey {v}](passkey_{v}.png)" for v in VARIANTS], ""]
    (run_dir / "report.md").write_text("\n".join(report))
    write_json(run_dir / "result.json", result)
    log(table)
    log(f"{cfg.name}: report {run_dir / 'report.md'} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
