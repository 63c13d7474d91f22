"""Objectives on the stdlib corpus with fill-in-the-middle samples (Bavarian et al., 2022): next-token
prediction vs multi-token prediction, parallel heads (Gloeckle et al., 2024) and sequential modules
(DeepSeek-V3, 2024), vs horizon-length prediction (Ding et al., 2024). Measured: held-out next-token
loss and exact match on single-line infilling from held-out files; for the parallel-heads model, the
acceptance of self-speculative greedy decoding with its MTP heads as the draft (Gloeckle et al., Sec. 3.2).

Knobs: train.steps per run; train.eval-batches sets the infilling samples (16 per batch).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments._fit import fit, run_dir_for
from horizon.config import Data, Decode, Experiment, Model, Objective, Optim, Train
from horizon.data.batches import FIM_END, Batches, fim_encode
from horizon.data.corpus import load_store
from horizon.eval.harness import greedy_decode, logits_fn
from horizon.eval.perplexity import loss_by_position
from horizon.eval.report import markdown_table, plot_curves, write_json
from horizon.infer.mtp_draft import mtp_speculative_generate

CONFIG = Experiment(
    name="mtp_hlp",
    claim="auxiliary future-prediction objectives (MTP, HLP) keep next-token loss and improve fill-in-the-middle "
          "exact match over next-token training alone",
    model=Model(d_model=64, n_layers=2, n_heads=2),
    data=Data(seq_len=256, batch_size=8, fim_rate=0.5),
    optim=Optim(lr=3e-3, warmup_steps=30),
    train=Train(steps=400, log_every=50, eval_batches=4),
)

OBJECTIVES = {
    "next-token": Objective(),
    "MTP parallel (n=2)": Objective(mtp="parallel", mtp_depth=1, mtp_weight=1.0),
    "MTP sequential (D=1)": Objective(mtp="sequential", mtp_depth=1, mtp_weight=1.0),
    "HLP": Objective(hlp_weight=1.0),
}
CONTEXT = 80  # bytes of prefix and of suffix around the infilled line (all fits in T = 256)
MAX_NEW = 48
SPEC_PROMPTS, SPEC_PROMPT_LEN, SPEC_NEW = 8, 64, 32  # self-speculation: held-out prompts, bytes each, new bytes


def infill_samples(split, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n (prefix, middle, suffix) from one split's documents: the middle is one whole line of 4-40
    bytes with some non-space content; prefix and suffix are up to CONTEXT bytes around it."""
    rng = np.random.default_rng([seed, 0xF111])
    toks, out = split.tokens, []
    nl = np.flatnonzero(toks == ord("\n"))
    while len(out) < n:
        i = int(rng.integers(1, len(nl) - 1))
        a, b = int(nl[i - 1]) + 1, int(nl[i])  # the line is toks[a:b]
        line = toks[a:b]
        if not 4 <= len(line) <= 40 or np.count_nonzero(line != ord(" ")) < 3:
            continue
        d = np.searchsorted(split.starts, a, side="right") - 1  # stay inside the line's document
        lo, hi = max(int(split.starts[d]), a - CONTEXT), min(int(split.starts[d + 1]), b + CONTEXT)
        out.append((toks[lo:a].astype(np.int32), line.astype(np.int32), toks[b:hi].astype(np.int32)))
    return out


def infill_exact_match(model, samples) -> dict:
    """Greedy infilling from <PRE> prefix <SUF> suffix <MID> until <END>: exact match of the line,
    how often <END> came, and the mean |generated length - true length|."""
    prompts = [fim_encode(p, np.zeros(0, np.int32), s)[:-1] for p, _, s in samples]
    outs = greedy_decode(model, prompts, max_new_tokens=MAX_NEW, stop_token=FIM_END, batch_size=16)
    exact, ended, len_err = [], [], []
    for (_, mid, _), o in zip(samples, outs):
        stopped = len(o) > 0 and o[-1] == FIM_END
        body = o[:-1] if stopped else o
        exact.append(float(stopped and np.array_equal(body, mid)))
        ended.append(float(stopped))
        len_err.append(abs(len(body) - len(mid)))
    return {"exact_match": float(np.mean(exact)), "end_rate": float(np.mean(ended)),
            "length_error": float(np.mean(len_err))}


def heldout_prompts(split, n: int, length: int, seed: int) -> np.ndarray:
    """[n, length] windows of held-out tokens, each inside one document."""
    rng = np.random.default_rng([seed, 0x5BEC])
    sizes = np.diff(split.starts)
    docs = np.flatnonzero(sizes > length)
    out = []
    for d in rng.choice(docs, size=n):
        a = int(split.starts[d]) + int(rng.integers(0, sizes[d] - length))
        out.append(split.tokens[a:a + length])
    return np.stack(out).astype(np.int32)


def self_speculation(model, prompts_BP) -> dict:
    """Greedy decoding of SPEC_NEW tokens with the model's parallel MTP heads drafting one token per
    head each round, verified in one target pass: mean accepted drafts per round, the acceptance
    rate of each head's draft (kept only after the earlier heads' were), tokens per target forward
    (prefill included; plain decoding: 1)."""
    res = mtp_speculative_generate(model, prompts_BP, decode=Decode(max_new_tokens=SPEC_NEW))
    return {"draft_tokens": res.k, "mean_accepted": res.mean_accepted,
            "acceptance_by_head": [float(a) for a in res.acceptance_by_depth()],
            "tokens_per_forward": res.tokens_per_forward()}


def heldout_loss(model, batches: Batches, n_batches: int, forward=None) -> float:
    """Mean next-token loss over held-out windows: loss by position, in one bucket."""
    return loss_by_position(model, batches, n_batches=n_batches, bucket=batches.cfg.seq_len,
                            forward=forward)["loss"][0]


def run(cfg: Experiment = CONFIG, *, log=print) -> dict:
    t0 = time.perf_counter()
    run_dir = run_dir_for(cfg)
    store = load_store(cfg.data.store)
    train_batches = Batches(store, cfg.data, split="train", seed=cfg.train.seed)
    held_fim = Batches(store, cfg.data, split="heldout", seed=cfg.train.seed)
    held_plain = Batches(store, dataclasses.replace(cfg.data, fim_rate=0.0), split="heldout", seed=cfg.train.seed)
    samples = infill_samples(held_plain.split, 16 * cfg.train.eval_batches, cfg.train.seed)
    spec_prompts = heldout_prompts(held_plain.split, SPEC_PROMPTS, SPEC_PROMPT_LEN, cfg.train.seed)
    results, curves, speculation = {}, {}, {}
    for name, obj in OBJECTIVES.items():
        sub = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, objective=obj))
        log(f"{name}: {cfg.train.steps} steps")
        model, curves[name] = fit(sub, train_batches, log=log)
        forward = logits_fn(model)  # one compiled forward for both held-out sets
        results[name] = {"heldout_loss": heldout_loss(model, held_plain, cfg.train.eval_batches, forward),
                         "heldout_loss_with_fim": heldout_loss(model, held_fim, cfg.train.eval_batches, forward),
                         **infill_exact_match(model, samples)}
        log(f"  {results[name]}")
        if obj.mtp == "parallel":
            speculation[name] = self_speculation(model, spec_prompts)
            log(f"  self-speculative decoding with the MTP heads: {speculation[name]}")

    base = results["next-token"]
    claims = {
        f"{k} held-out loss within 0.05 nats of next-token": abs(v["heldout_loss"] - base["heldout_loss"]) < 0.05
        for k, v in results.items() if k != "next-token"}
    claims.update({f"{k} infilling exact match > next-token": v["exact_match"] > base["exact_match"]
                   for k, v in results.items() if k != "next-token"})
    table = markdown_table(
        ["objective", "held-out loss (nats)", "held-out loss, FIM mix", "infill exact match", "<END> rate",
         "length error (bytes)"],
        [[k, v["heldout_loss"], v["heldout_loss_with_fim"], v["exact_match"], v["end_rate"], v["length_error"]]
         for k, v in results.items()])
    plot_curves(run_dir / "train_loss.png", {k: tuple(zip(*c)) for k, c in curves.items()}, xlabel="step",
                ylabel="training loss (objective, nats)", title="training objective")
    n = len(samples)
    report = [f"# {cfg.name}", "", f"Claim: {cfg.claim}.", "",
              (f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.train.steps} steps at T = "
              f"{cfg.data.seq_len}, {int(cfg.data.fim_rate * 100)}% of document pieces as PSM FIM samples. "
              f"Held-out loss is next-token cross-entropy on plain held-out windows; infilling: {n} single lines "
              f"from held-out files with {CONTEXT} bytes of context each side, greedy until <END> "
              f"(at most {MAX_NEW} bytes)."), "", table, "",
              "| claim | held at this scale |", "|---|---|",
              *[f"| {k} | {'yes' if ok else 'no'} |" for k, ok in claims.items()], "",
              "Training loss includes each objective's auxiliary terms, so curves are not comparable across rows.",
              "", *_speculation_section(speculation), "![train loss](train_loss.png)", ""]
    (run_dir / "report.md").write_text("\n".join(report))
    result = {"results": results, "claims": claims, "n_infill": n, "self_speculation": speculation,
              "seconds": time.perf_counter() - t0}
    write_json(run_dir / "result.json", result)
    log(table)
    log(f"{cfg.name}: report {run_dir / 'report.md'} ({result['seconds']:.0f} s)")
    return result


def _speculation_section(speculation: dict) -> list[str]:
    if not speculation:
        return []
    table = markdown_table(
        ["model", "draft tokens / round", "mean accepted", "acceptance by head", "tokens / target forward"],
        [[k, v["draft_tokens"], v["mean_accepted"], ", ".join(f"{a:.3f}" for a in v["acceptance_by_head"]),
          v["tokens_per_forward"]] for k, v in speculation.items()])
    return [("Self-speculative greedy decoding (Gloeckle et al., 2024, Sec. 3.2): each round one target pass "
            "verifies the MTP heads' drafts and the heads at the last kept position draft the next round "
            f"(no draft model); {SPEC_PROMPTS} held-out prompts of {SPEC_PROMPT_LEN} bytes, {SPEC_NEW} new "
            "bytes each; the output equals plain greedy decoding."), "", table, ""]


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
