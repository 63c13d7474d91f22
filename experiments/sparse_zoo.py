"""Sparse-attention zoo: one byte LM trained with dense attention at length T on the stdlib corpus
mixed with passkey retrieval, then evaluated training-free at T, 2T and 4T under every selection
policy (dense causal; sliding window; StreamingLLM sinks, Xiao et al., 2023; EMA sinks, Reward
Forcing, 2025; LongGen, Ge et al., 2024; LongHeads, Lu et al., 2024; HiP, Lee et al., 2024; CCA,
Chen et al., 2024): held-out loss and passkey accuracy against the fraction of dense causal
attention FLOPs each policy spends (horizon.attention.selection.attention_flop_fraction).

Knobs: data.seq-len is T; train.steps the dense training run; train.eval-batches the passkey
samples per (policy, length, depth) cell. The policies' budgets scale with T (POLICY_NOTES).
"""

from __future__ import annotations

import dataclasses
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from experiments._fit import fit, run_dir_for
from experiments.context_extension import RetrievalMixture
from horizon.attention import policies as policy_registry
from horizon.attention.selection import attention_flop_fraction
from horizon.config import Attention, Data, Experiment, Model, Optim, Pose, Train
from horizon.data.batches import Batches
from horizon.data.corpus import load_store
from horizon.eval.harness import argmax_fn, check_length, evaluate_task
from horizon.eval.perplexity import loss_by_position
from horizon.eval.report import markdown_table, write_json
from horizon.eval.tasks import TASKS
from horizon.models.lm import with_config

CONFIG = Experiment(
    name="sparse_zoo",
    claim="training-free sparse attention extends a dense-trained model: StreamingLLM's sinks + window keep "
          "the loss flat past the training length, HiP and LongHeads keep passkey retrieval, at a fraction "
          "of dense attention's FLOPs",
    model=Model(d_model=128, n_layers=2, n_heads=4),
    data=Data(seq_len=128, batch_size=16),
    optim=Optim(lr=2e-3, warmup_steps=30),
    train=Train(steps=1600, log_every=100, eval_batches=8),
)

POLICIES = ("dense_causal", "sliding_window", "sinks", "ema_sink", "longgen", "longheads", "hip", "cca")
FACTORS = (1, 2, 4)  # evaluation lengths, in training lengths
DEPTHS = (0.1, 0.5, 0.9)  # passkey depths
EVAL_BATCH = 8  # passkey and loss batches share it (one compile per policy and length)
LOSS_BATCHES = 2  # held-out batches of EVAL_BATCH windows per (policy, length)
# Policies whose keys get RoPE positions inside the trained range (horizon.attention.policies):
# StreamingLLM's sinks are rotated to sit just before the window, LongHeads lays its chunks side
# by side before the local blocks. The rest see true distances: up to L for dense causal, HiP and
# LongGen's dense layer; below the window for the window policies' main keys (RoPE is relative).
REMAPS_POSITIONS = ("sinks", "longheads")


def eval_block(T: int) -> int:
    """The block size of the evaluation Selections: 8 blocks per training length (at least 4)."""
    return max(4, T // 8)


def policy_attention(name: str, T: int) -> Attention:
    """The attention config of policy `name` for a model trained at length T: window T/4, 4 sink
    tokens, HiP budget 2 blocks (+ 1 sink + 2 local), LongHeads at most T keys per head, LongGen
    stride 4, CCA one core token per block."""
    b = eval_block(T)
    w, local = T // 4, max(1, (T // 4) // b)
    return {
        "dense_causal": Attention(block=b),
        "sliding_window": Attention(policy="sliding_window", block=b, window=w),
        "sinks": Attention(policy="sinks", block=b, window=w, n_sinks=4),
        "ema_sink": Attention(policy="ema_sink", block=b, window=w, n_sinks=4),
        "longgen": Attention(policy="longgen", block=b, options=f"stride=4,local_blocks={local},sink_blocks=1"),
        "longheads": Attention(policy="longheads", block=b, options=f"trained_length={T},local_blocks={local}"),
        "hip": Attention(policy="hip", block=b, options=f"budget=2,local_blocks={local},sink_blocks=1"),
        "cca": Attention(policy="cca", block=b, window=w, options=f"group={b}"),
    }[name]


class ProbedForward:
    """horizon.eval.harness.logits_fn's contract, (tokens, positions, segment_ids) -> logits, that
    also records each call's attention FLOP fraction (the mean over the model's attention layers
    of attention_flop_fraction of the Selections they build, with their real queries and keys).

    The Selections exist only inside the traced forward, so while tracing, policies.build is
    wrapped to report each one; the compiled forward returns the fraction beside the logits.
    """

    def __init__(self, model):
        from flax import nnx

        graphdef, params = nnx.split(model)
        self.params, self.fractions = params, []

        def run(params, tokens_BT, positions_BT, segment_ids_BT):
            seen, build = [], policy_registry.build

            def recording_build(*args, **kwargs):
                sel = build(*args, **kwargs)
                seen.append(attention_flop_fraction(sel))
                return sel

            with mock.patch.object(policy_registry, "build", recording_build):
                logits = nnx.merge(graphdef, params)(tokens_BT, positions_BT=positions_BT,
                                                     segment_ids_BT=segment_ids_BT)
            return logits, jnp.mean(jnp.stack(seen))

        self._run = jax.jit(run)

    def __call__(self, tokens, positions=None, segment_ids=None):
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)) if positions is None else positions
        segment_ids = np.zeros((B, T), np.int32) if segment_ids is None else segment_ids
        logits, fraction = self._run(self.params, *(jnp.asarray(a, jnp.int32) for a in (tokens, positions, segment_ids)))
        self.fractions.append(float(fraction))
        return np.asarray(logits)


def _weighted(curve: dict, lo: int, hi: float) -> float:
    xs = [(lv, k) for s, lv, k in zip(curve["bucket_start"], curve["loss"], curve["count"]) if lo <= s < hi]
    return sum(lv * k for lv, k in xs) / sum(k for _, k in xs) if xs else float("nan")


def evaluate_policy(base, cfg: Experiment, name: str, L: int, store, *, log=print) -> dict:
    """Passkey accuracy (mean over DEPTHS), held-out loss (all positions, and positions >= T) and
    the FLOP fraction on single-document passkey rows of length L, under policy `name`."""
    T = cfg.data.seq_len
    mcfg = dataclasses.replace(cfg.model, attention=policy_attention(name, T))
    check_length(cfg, L, model_cfg=mcfg, allow_extrapolation=True)  # extrapolating is the point
    model = with_config(base, mcfg)
    forward = ProbedForward(model)
    res = evaluate_task(model, TASKS["passkey"], [L], DEPTHS, n_samples=cfg.train.eval_batches,
                        seed=cfg.train.seed + 1, batch_size=EVAL_BATCH, argmax=argmax_fn(model, forward))
    fraction = float(np.mean(forward.fractions))
    held = dataclasses.replace(cfg.data, seq_len=L, batch_size=EVAL_BATCH, pose=Pose(), fim_rate=0.0)
    curve = loss_by_position(model, Batches(store, held, split="heldout", seed=cfg.train.seed),
                             n_batches=LOSS_BATCHES, bucket=T, forward=forward)
    out = {"policy": name, "length": L, "flop_fraction": fraction,
           "passkey": float(np.mean(res["accuracy"][0])), "passkey_by_depth": res["accuracy"][0],
           # The digits alone: a copying model may end the key with "." (as in the haystack) not "\n".
           "passkey_digits": float(np.mean([r["pred"].startswith(r["answer"]) for r in res["samples"]])),
           "passkey_first_digit": float(np.mean([r["pred"][:1] == r["answer"][:1] for r in res["samples"]])),
           "passkey_examples": [{k: r[k] for k in ("x", "answer", "pred")}  # one per depth
                                for r in res["samples"][::cfg.train.eval_batches]],
           "loss": _weighted(curve, 0, np.inf), "loss_below_T": _weighted(curve, 0, T),
           "loss_past_T": _weighted(curve, T, np.inf), "loss_by_position": curve}
    log(f"  {name} @ {L}: flops {fraction:.3f}, passkey {out['passkey']:.2f} (digits {out['passkey_digits']:.2f}), "
        f"loss {out['loss']:.3f} "
        f"(past T {out['loss_past_T']:.3f})")
    return out


def plot_tradeoff(path, rows: list[dict]) -> None:
    """Loss and passkey accuracy against FLOP fraction: a colour per policy, a marker per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # no gray: lengths use black
    colours = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    markers = dict(zip(lengths, "o^sDvP"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for ax, key, label in ((axes[0], "loss", "held-out loss (nats)"), (axes[1], "passkey_digits", "passkey digits retrieved")):
        for r in rows:
            ax.scatter(r["flop_fraction"], r[key], color=colours[r["policy"]], marker=markers[r["length"]], s=40)
        ax.set_xlabel("fraction of dense causal attention FLOPs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.05, 1.05)
    handles = [plt.Line2D([], [], color=colours[n], marker="o", linestyle="", label=n) for n in names]
    handles += [plt.Line2D([], [], color="black", marker=markers[L], linestyle="", label=f"L={L}") for L in lengths]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("training-free sparse attention: quality vs attention FLOPs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _claims(by: dict, names, T: int) -> dict:
    """Each claim -> (held, evidence), judged on the measured numbers; None when a policy is absent."""
    long = max(L for (_, L) in by)
    out = {}
    if "dense_causal" in names:
        d1, d4 = by[("dense_causal", T)], by[("dense_causal", long)]
        out["the dense-trained base retrieves at T (passkey digits >= 0.5)"] = (
            d1["passkey_digits"] >= 0.5,
            f"dense at {T}: digits {d1['passkey_digits']:.2f}, exact match {d1['passkey']:.2f}")
        out[f"dense attention fails past T (plain RoPE, expected): passkey or loss worse at {long}"] = (
            d4["passkey_digits"] < d1["passkey_digits"] - 0.25 or d4["loss_past_T"] > d1["loss"] + 0.1,
            (f"passkey digits {d1['passkey_digits']:.2f} -> {d4['passkey_digits']:.2f}; loss {d1['loss']:.3f} at {T}, "
             f"{d4['loss_past_T']:.3f} past T at {long}"))
    if "sinks" in names:
        s = by[("sinks", long)]
        out[f"StreamingLLM: sinks + window keep the loss flat past T (at {long}, within 0.1 nats of pos < T)"] = (
            s["loss_past_T"] <= s["loss_below_T"] + 0.1,
            f"sinks at {long}: {s['loss_below_T']:.3f} below T, {s['loss_past_T']:.3f} past T")
    for n in ("hip", "longheads"):
        if n in names and "dense_causal" in names:
            ref, p = by[("dense_causal", T)]["passkey_digits"], by[(n, long)]["passkey_digits"]
            out[f"{n}: training-free extension keeps retrieval (passkey digits at {long} >= 0.75 x dense at {T}, "
                f"and > dense at {long})"] = (
                ref >= 0.5 and p >= 0.75 * ref and p > by[("dense_causal", long)]["passkey_digits"],
                (f"{n} {p:.2f} at {long}, dense {ref:.2f} at {T}, dense "
                 f"{by[('dense_causal', long)]['passkey_digits']:.2f} at {long}"))
    return out


def run(cfg: Experiment = CONFIG, *, log=print, policies: tuple[str, ...] = POLICIES) -> dict:
    t0 = time.perf_counter()
    run_dir = run_dir_for(cfg)
    T, seed = cfg.data.seq_len, cfg.train.seed
    lengths = tuple(f * T for f in FACTORS)
    store = load_store(cfg.data.store)
    for name in policies:  # refuse bad lengths and unknown policies before training
        for L in lengths:
            check_length(cfg, L, model_cfg=dataclasses.replace(cfg.model, attention=policy_attention(name, T)),
                         allow_extrapolation=True)

    log(f"dense base: {cfg.train.steps} steps at T={T} (passkey rows mixed in)")
    base, base_losses = fit(cfg, RetrievalMixture(store, cfg.data, seed=seed, tasks=("passkey",)), log=log)
    t_train = time.perf_counter() - t0

    by = {}
    for name in policies:
        for L in lengths:
            by[(name, L)] = evaluate_policy(base, cfg, name, L, store, log=log)
    rows = [by[(n, L)] for n in policies for L in lengths]
    claims = _claims(by, policies, T)

    plot_tradeoff(run_dir / "tradeoff.png", rows)
    headers = ["policy", "length", "FLOP fraction", "passkey", "passkey digits", "first digit", "held-out loss", f"loss pos<{T}",
               f"loss pos>={T}", "RoPE positions"]
    table = markdown_table(headers, [
        [r["policy"], r["length"], r["flop_fraction"], r["passkey"], r["passkey_digits"], r["passkey_first_digit"], r["loss"], r["loss_below_T"], r["loss_past_T"],
         "remapped" if r["policy"] in REMAPS_POSITIONS else "true"] for r in rows])
    seconds = time.perf_counter() - t0
    b = eval_block(T)
    report = [
        f"# {cfg.name}", "", f"Claim: {cfg.claim}.", "",
        (f"Base: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, dense causal "
         f"attention, trained {cfg.train.steps} steps of {cfg.data.batch_size} x {T} bytes (passkey rows and "
         f"repeated-string rows mixed into the corpus, experiments.context_extension.RetrievalMixture). Then, with "
         f"no further training, each policy at lengths {', '.join(map(str, lengths))} with blocks of {b}: window "
         f"{T // 4}, 4 sink tokens, HiP budget 2 blocks + 1 sink + {max(1, (T // 4) // b)} local, LongHeads at "
         f"most {T} keys per head, LongGen stride 4 (its middle third of layers dense), CCA one core token per "
         f"{b} tokens. Passkey: exact match of the greedy answer, {cfg.train.eval_batches} samples x "
         f"{len(DEPTHS)} depths {DEPTHS} per cell; \"passkey digits\": the greedy answer starts with the 5 "
         "key digits, whatever byte follows (a copying model may end the key with the haystack's \".\"); the "
         f"retrieval measure the claims use; \"first digit\": its first digit is right (chance 0.1). Loss: held-out corpus (nats/byte), {LOSS_BATCHES} x "
         f"{EVAL_BATCH} windows of the evaluation length, by within-document position. FLOP fraction: live "
         "(query block, key block) tiles, sinks / pooled rows included, over the causal tiles of dense "
         "attention, on the passkey rows, mean over layers and heads."), "",
        (f"Positions past T = {T} are out of distribution for plain RoPE, so dense attention is expected to fail "
         f"at {2 * T} and {4 * T}. Of the policies, {' and '.join(REMAPS_POSITIONS)} remap key positions into "
         "the trained range (StreamingLLM's sinks are rotated to sit just before the window; LongHeads lays its "
         "chosen chunks side by side). Sliding window, EMA sinks and CCA only attend keys within the window at "
         "their true (relative) distance, plus summary rows; HiP and LongGen's dense layer see true distances up "
         "to the full length."), "",
        table, "",
        "| claim | held at this scale | evidence |", "|---|---|---|",
        *[f"| {k} | {'yes' if ok else 'no'} | {ev} |" for k, (ok, ev) in claims.items()], "",
        "![loss and passkey accuracy vs FLOP fraction](tradeoff.png)", "",
        f"Wall time {seconds:.0f} s ({t_train:.0f} s training).", "",
    ]
    (run_dir / "report.md").write_text("\n".join(report))
    result = {"lengths": list(lengths), "policies": list(policies), "block": b,
              "rows": [{k: v for k, v in r.items()} for r in rows],
              "claims": {k: bool(ok) for k, (ok, _) in claims.items()}, "base_losses": base_losses,
              "seconds": seconds, "train_seconds": t_train}
    write_json(run_dir / "result.json", result)
    log(table)
    log(f"{cfg.name}: report {run_dir / 'report.md'} ({seconds:.0f} s)")
    return result


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
