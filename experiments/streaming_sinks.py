"""Attention sinks in streaming decode (StreamingLLM, Xiao et al., 2023, "Efficient Streaming
Language Models with Attention Sinks"): a small byte LM streams a held-out stdlib file much longer
than its KV cache, token by token, under (a) a full cache, (b) a window-only ring, (c) window + 4
sinks (keys re-rotated at cache positions, Sec. 3.2), (d) EMA sinks (Reward Forcing, 2025); and,
at a long context, passkey accuracy, decode tokens/s and KV bytes of each decode-time policy (full,
TokenSelect, TidalDecode, Squeezed Attention, HiP, the streaming cache).

Knobs: data.seq-len is T (the training window; the streamed text is TEXT_FACTOR * T tokens, cache
sizes are CACHE_FRACTIONS of T, the policy table's long context is max(LONG_FACTOR * T,
data.pose.target-length)); train.eval-batches the passkey samples per length. The default trains
without PoSE: a PoSE run to 8K positions (data.pose.target-length 8192, 1600 steps) learned no
passkey retrieval even at T, so at 8K the accuracy is bounded by the training length; the plain
forward's accuracy on the same samples is reported beside the decode policies as a cross-check.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments._fit import fit, run_dir_for
from experiments.context_extension import RetrievalMixture
from horizon.config import Data, Decode, Experiment, Model, Optim, Train
from horizon.data.batches import split_documents
from horizon.data.corpus import load_store
from horizon.data.tokenizer import get_tokenizer
from horizon.errors import ConfigError, DataError
from horizon.eval.harness import answer_matches, argmax_fn
from horizon.eval.report import markdown_table, plot_curves, write_json
from horizon.eval.tasks import NOISE, passkey
from horizon.infer import selectors
from horizon.infer import step as steps
from horizon.infer.cache import cache_bytes
from horizon.infer.selectors import get_selector

CONFIG = Experiment(
    name="streaming_sinks",
    claim="a window-only KV cache's loss blows up once the first tokens are evicted, while keeping 4 sink "
          "tokens (StreamingLLM) or EMA sinks keeps it flat; decode-time selectors keep passkey accuracy at "
          "long context with less attention work",
    model=Model(d_model=96, n_layers=3, n_heads=4),
    data=Data(seq_len=128, batch_size=16),
    optim=Optim(lr=3e-3, warmup_steps=30),
    train=Train(steps=1600, log_every=100, eval_batches=6),
)

TEXT_FACTOR = 16  # streamed text length = TEXT_FACTOR * T tokens
CACHE_FRACTIONS = (0.5, 1.0)  # cache sizes as fractions of T
N_SINKS = 4  # StreamingLLM's choice (Sec. 4.1: four initial tokens suffice)
EMA = 0.9  # EMA-sink decay
SMOOTH = 64  # tokens in the moving average of the loss plot
TIMED_STEPS = 32  # decode steps per timed call (after a compiling warm-up call)
LONG_FACTOR = 64  # the policy table's long context: max(LONG_FACTOR * T, data.pose.target_length)
SHORT_FACTORS = (1, 8)  # passkey also at these multiples of T (below the long context): is it length?
MIX = {"retrieval": 0.375, "induction": 0.375}  # training rows: passkey, repeated strings; rest corpus
STREAM_CACHES = {  # label -> (cache kind, sinks)
    "window": ("streaming", 0),
    f"window+{N_SINKS} sinks": ("streaming", N_SINKS),
    f"ema_sink ({N_SINKS})": ("ema_sink", N_SINKS),
}


# ------------------------------------------------------------------------------------ streaming


def _decode(kind: str, size: int, n_sinks: int) -> Decode:
    return Decode(cache=kind, cache_size=size, n_sinks=n_sinks, ema=EMA)


def stream_losses(model, decode: Decode, tokens_T: np.ndarray, *, capacity: int) -> np.ndarray:
    """float32 [T - 1]: -log p(tokens[t + 1] | the cache after tokens[:t + 1]), feeding the true
    tokens one at a time through horizon.infer.step.decode_step (teacher forcing) in one jitted scan."""
    graphdef, state = nnx.split(model)
    sel = get_selector("full")

    @jax.jit
    def run(state, toks_T):
        m = nnx.merge(graphdef, state)
        caches = steps.init_caches(m, decode, batch=1, capacity=capacity)
        layer_states = steps.prepare_selector(sel, caches, m)

        def body(carry, x):
            cs, ls = carry
            tok, nxt = x
            logits_BV, cs, ls = steps.decode_step(m, cs, tok[None], sel, ls)
            return (cs, ls), -jax.nn.log_softmax(logits_BV[0])[nxt]

        return jax.lax.scan(body, (caches, layer_states), (toks_T[:-1], toks_T[1:]))[1]

    return np.asarray(run(state, jnp.asarray(tokens_T, jnp.int32)))


def heldout_text(cfg: Experiment, n_tokens: int) -> np.ndarray:
    """The first n_tokens of the longest held-out document of the corpus (int32)."""
    store = load_store(cfg.data.store)
    ids = split_documents(store, cfg.data.heldout_fraction)["heldout"]
    docs = [store.document(int(i)) for i in ids]
    best = max(docs, key=len)
    if len(best) < n_tokens:
        raise DataError(f"the longest held-out document has {len(best)} tokens, fewer than the {n_tokens} to "
                        f"stream (TEXT_FACTOR x data.seq_len); use a smaller data.seq_len or a larger corpus")
    return np.asarray(best[:n_tokens], np.int32)


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    w = max(1, min(w, len(x)))
    c = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    return (c[w:] - c[:-w]) / w  # entry i: mean of x[i : i + w]


def stream_plots(run_dir, curves: dict, sizes, T: int) -> None:
    """Per cache size: the smoothed loss of every cache (stream_loss_C.png), and each cache's loss
    minus window + sinks' (stream_gap_C.png: StreamingLLM's blow-up would show as the window-only
    line rising above 0 once position C is passed)."""
    L = len(curves["full"]) + 1
    x = np.arange(L - SMOOTH) + SMOOTH // 2
    sink = f"window+{N_SINKS} sinks"
    for C in sizes:
        keys = [("full", "full"), *[(lab, f"{lab} @{C}") for lab in STREAM_CACHES]]
        plot_curves(run_dir / f"stream_loss_{C}.png", {lab: (x, _smooth(curves[k], SMOOTH)) for lab, k in keys},
                    xlabel="position in the stream", ylabel=f"loss (nats, mean of {SMOOTH})",
                    title=f"{L} held-out tokens, {C}-slot cache (T={T})")
        ref = np.asarray(curves[f"{sink} @{C}"])
        plot_curves(run_dir / f"stream_gap_{C}.png",
                    {lab: (x, _smooth(np.asarray(curves[k]) - ref, SMOOTH)) for lab, k in keys if lab != sink},
                    xlabel="position in the stream", ylabel=f"loss - {sink} (nats, mean of {SMOOTH})",
                    title=f"gap to {sink}, {C}-slot cache (fills at {C})", hlines={"0": 0.0})


# ---------------------------------------------------------------------------- decode policies


def policies(cfg: Experiment, length: int) -> dict:
    """label -> selector for a full cache at context `length` (budgets ~1/32 of it), or None for
    the streaming cache row."""
    budget = max(8, length // 32)
    window = max(4, min(64, length // 32))
    block = max(8, min(64, length // 64))
    h = cfg.model.n_heads
    # TidalDecode selects at layer 2 in the paper's deep stacks; a toy stack of 2-4 layers selects
    # at its second-to-last layer at most, so at least one layer reuses the selection.
    return {
        "full": get_selector("full"),
        "tokenselect": selectors.get("tokenselect")(budget=budget, window=window, n_sinks=N_SINKS,
                                                    threshold=0.9, n_heads=h),
        "tidaldecode": selectors.get("tidaldecode")(budget=budget, window=window, n_sinks=N_SINKS,
                                                    n_layers=cfg.model.n_layers,
                                                    selection_layers=(max(0, min(2, cfg.model.n_layers - 2)),)),
        "squeezed": selectors.get("squeezed")(budget=budget, n_clusters=max(4, min(64, length // 64)),
                                              window=window, n_sinks=N_SINKS, max_new=TIMED_STEPS),
        "hip": selectors.get("hip")(budget=max(1, budget // block), block_k=block),
        f"streaming ({N_SINKS} sinks)": None,
    }


def _timed_decode(model, sel):
    """(prep, run), both jitted: prep(state, caches) -> per-layer selector states (once per prompt:
    Squeezed's k-means, HiP's block means), kept out of the timed run(state, caches, states,
    toks [N]) -> argmax [N], N teacher-forced decode steps in one scan."""
    graphdef, _ = nnx.split(model)
    sel = sel or get_selector("full")

    @jax.jit
    def prep(state, caches):
        return steps.prepare_selector(sel, caches, nnx.merge(graphdef, state))

    @jax.jit
    def run(state, caches, ls, toks_N):
        m = nnx.merge(graphdef, state)

        def body(carry, tok):
            cs, ls = carry
            logits_BV, cs, ls = steps.decode_step(m, cs, tok[None], sel, ls)
            return (cs, ls), jnp.argmax(logits_BV[0]).astype(jnp.int32)

        return jax.lax.scan(body, (caches, ls), toks_N)[1]

    return prep, run


def _samples(cfg: Experiment, length: int) -> list:
    n = cfg.train.eval_batches
    return [passkey(cfg.train.seed + 1000 + i, length, (i + 0.5) / n) for i in range(n)]


def policy_table(model, cfg: Experiment, length: int, *, log=print) -> dict:
    """label -> {accuracy, tokens_per_s, kv_bytes} at context `length`: passkey samples at evenly
    spread depths; the prompt minus its last token goes in by prefill (full cache) or by streaming
    (the streaming cache); then the last prompt token and the answer are fed one decode step at a
    time under each policy and the sample counts when every argmax is the gold next token (greedy
    decoding's verdict). Tokens/s: the second call of a jitted scan of TIMED_STEPS decode steps."""
    tok = get_tokenizer()
    graphdef, state = nnx.split(model)
    n = cfg.train.eval_batches
    sels = policies(cfg, length)
    hits = {k: 0 for k in sels}
    tps = {k: [] for k in sels}
    kvb = {}
    blk = max(8, min(64, length // 64))
    capacity = -(-(length + TIMED_STEPS) // blk) * blk  # HiP needs whole blocks
    stream_size = cfg.data.seq_len
    full_dec = Decode(cache="full", cache_size=capacity)
    stream_dec = _decode("streaming", stream_size, N_SINKS)

    @jax.jit
    def prefill(state, toks_1P):
        m = nnx.merge(graphdef, state)
        caches = steps.init_caches(m, full_dec, batch=1, capacity=capacity)
        return steps.prefill(m, caches, toks_1P, jnp.array([toks_1P.shape[1]], jnp.int32))[1]

    @jax.jit
    def stream_in(state, toks_1P):
        m = nnx.merge(graphdef, state)
        caches = steps.init_caches(m, stream_dec, batch=1, capacity=stream_size)
        return steps.extend(m, caches, toks_1P)[1]

    fns = {k: _timed_decode(model, s) for k, s in sels.items()}
    for i, s in enumerate(_samples(cfg, length)):
        toks = tok.encode(s.text).astype(np.int32)
        P = len(s.prompt)
        # fed: the last prompt token, the answer, then filler up to TIMED_STEPS; checked: the first
        # len(answer) + 1 argmaxes (answer + "\n")
        filler = tok.encode(NOISE * (TIMED_STEPS // len(NOISE) + 1)).astype(np.int32)
        fed = np.concatenate([toks[P - 1:-1], filler])[:TIMED_STEPS]
        gold = toks[P:]
        assert len(gold) <= TIMED_STEPS, (len(gold), TIMED_STEPS)
        head = jnp.asarray(toks[None, :P - 1])
        full_caches = jax.block_until_ready(prefill(state, head))
        stream_caches = None
        for k, sel in sels.items():
            if sel is None:
                if stream_caches is None:
                    stream_caches = jax.block_until_ready(stream_in(state, head))
                caches = stream_caches
            else:
                caches = full_caches
            prep, run = fns[k]
            ls = jax.block_until_ready(prep(state, caches))
            out = np.asarray(run(state, caches, ls, jnp.asarray(fed)))  # first call compiles
            hits[k] += int(np.array_equal(out[:len(gold)], gold))
            t0 = time.perf_counter()
            jax.block_until_ready(run(state, caches, ls, jnp.asarray(fed)))
            tps[k].append(TIMED_STEPS / (time.perf_counter() - t0))
            kvb[k] = cache_bytes(caches)
        log(f"  passkey sample {i + 1}/{n} at {length}: " + ", ".join(f"{k} {hits[k]}" for k in sels))
    # the median over samples damps the noise of a shared CPU
    return {k: {"accuracy": hits[k] / n, "tokens_per_s": float(np.median(tps[k])), "kv_bytes": kvb[k]}
            for k in sels}


# ------------------------------------------------------------------------------------------- run


def run(cfg: Experiment = CONFIG, *, log=print) -> dict:
    t0 = time.perf_counter()
    run_dir = run_dir_for(cfg)
    T, seed = cfg.data.seq_len, cfg.train.seed
    if set(cfg.model.mixers) != {"attn"} or cfg.model.attention.policy != "dense_causal":
        raise ConfigError("streaming_sinks: model.layer_pattern must be 'attn' and model.attention.policy "
                          "'dense_causal' (the caches are compared on a dense attention-only LM)")
    long_len = max(cfg.data.pose.target_length, LONG_FACTOR * T)
    store = load_store(cfg.data.store)

    log(f"train: {cfg.train.steps} steps at T={T}" + (f", PoSE positions to {long_len}"
                                                       if cfg.data.pose.target_length else ""))
    model, losses = fit(cfg, RetrievalMixture(store, cfg.data, seed=seed, tasks=("passkey",), **MIX), log=log)
    t_train = time.perf_counter() - t0

    # ---- part 1: streaming a long held-out text -------------------------------------------------
    L = TEXT_FACTOR * T
    text = heldout_text(cfg, L)
    sizes = sorted({max(N_SINKS + 2, int(f * T)) for f in CACHE_FRACTIONS})
    curves = {"full": stream_losses(model, Decode(cache="full", cache_size=L), text, capacity=L)}
    log(f"full cache over {L} tokens: mean loss {curves['full'].mean():.3f}")
    for C in sizes:
        for label, (kind, ns) in STREAM_CACHES.items():
            curves[f"{label} @{C}"] = stream_losses(model, _decode(kind, C, ns), text, capacity=C)
            log(f"{label} @{C}: mean loss {curves[f'{label} @{C}'].mean():.3f}")
    t_stream = time.perf_counter() - t0 - t_train

    def mean(x, lo, hi):
        return float(np.mean(x[lo:hi]))

    # loss index t predicts token t + 1 with t + 1 tokens seen: the cache first overflows at t = C
    stream_rows, stream_res = [], {}
    for C in sizes:
        for label in ["full", *STREAM_CACHES]:
            x = curves["full" if label == "full" else f"{label} @{C}"]
            before, after = mean(x, 0, C), mean(x, C, len(x))
            stream_rows.append([C, label, before, after, after - mean(curves["full"], C, len(x))])
            stream_res[f"{label} @{C}"] = {"before_fill": before, "after_fill": after}
    stream_plots(run_dir, curves, sizes, T)
    stream_table = markdown_table(["cache size", "cache", "mean loss pos < size", "mean loss pos >= size",
                                   "after - full after"], stream_rows)
    log(stream_table)

    # ---- part 2: decode policies at a long context ----------------------------------------------
    p_lengths = sorted({f * T for f in SHORT_FACTORS if f * T < long_len} | {long_len})
    pol, fwd = {}, {}
    for Lp in p_lengths:
        log(f"decode policies at {Lp} tokens, {cfg.train.eval_batches} passkey samples")
        pol[Lp] = policy_table(model, cfg, Lp, log=log)
        if Lp <= 8 * T:  # the same samples scored by the plain cache-free forward: a cross-check
            scores, _ = answer_matches(argmax_fn(model), _samples(cfg, Lp), batch_size=cfg.train.eval_batches)
            fwd[Lp] = float(np.mean(scores))
    t_pol = time.perf_counter() - t0 - t_train - t_stream
    at_long = pol[long_len]
    full_tps = at_long["full"]["tokens_per_s"]
    pol_rows = [[k, *[pol[Lp][k]["accuracy"] for Lp in p_lengths], v["tokens_per_s"], v["tokens_per_s"] / full_tps,
                 v["kv_bytes"]] for k, v in at_long.items()]
    pol_rows.append(["plain forward (no cache)", *[fwd.get(Lp, "-") for Lp in p_lengths], "-", "-", "-"])
    pol_table = markdown_table(["policy", *[f"passkey acc @{Lp}" for Lp in p_lengths], f"decode tokens/s @{long_len}",
                                "x full", f"KV bytes @{long_len} (all layers)"], pol_rows)
    log(pol_table)

    def after(lab, C):
        return stream_res[f"{lab} @{C}"]["after_fill"]

    win, sink, ema = STREAM_CACHES  # labels, in order: window, window + sinks, EMA sinks
    fast = max(at_long["tokenselect"]["tokens_per_s"], at_long["tidaldecode"]["tokens_per_s"])
    claims = {
        f"window-only loss after eviction > {N_SINKS} sinks' + 0.1 nats (every cache size)":
            all(after(win, C) > after(sink, C) + 0.1 for C in sizes),
        f"{N_SINKS} sinks after the fill stay within 0.1 nats of the full cache (every cache size)":
            all(after(sink, C) < after("full", C) + 0.1 for C in sizes),
        "EMA sinks beat window-only after eviction (every cache size)":
            all(after(ema, C) < after(win, C) for C in sizes),
        f"full attention retrieves the passkey at {long_len} (accuracy >= 0.5)": at_long["full"]["accuracy"] >= 0.5,
        f"TokenSelect or TidalDecode passkey within 5 points of full at {long_len}":
            max(at_long["tokenselect"]["accuracy"], at_long["tidaldecode"]["accuracy"])
            >= at_long["full"]["accuracy"] - 0.05,
        f"TokenSelect or TidalDecode decodes faster than full at {long_len}": fast > full_tps,
    }
    seconds = time.perf_counter() - t0
    result = {"text_tokens": L, "cache_sizes": sizes, "streaming": stream_res, "long_context": long_len,
              "policy_lengths": p_lengths, "policies": {str(k): v for k, v in pol.items()},
              "plain_forward_accuracy": {str(k): v for k, v in fwd.items()}, "claims": claims, "train_losses": losses,
              "loss_by_position": {k: v.tolist() for k, v in curves.items()},
              "seconds": {"train": t_train, "streaming": t_stream, "policies": t_pol, "total": seconds}}
    report = [
        f"# {cfg.name}", "", f"Claim: {cfg.claim}.", "",
        (f"Model: {cfg.model.n_layers} attention layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
         f"trained {cfg.train.steps} steps at T = {T} (final loss {losses[-1][1]:.3f}) on the stdlib corpus with "
         f"{MIX['retrieval']:.0%} passkey rows and {MIX['induction']:.0%} repeated-string rows"
         + (f", PoSE positions to {cfg.data.pose.target_length}" if cfg.data.pose.target_length else "") + "."),
        "", f"## Streaming {L} held-out tokens token by token (teacher forcing)", "",
        ("Loss (nats) of the next true token; 'pos < size' is before the cache first fills (all caches hold "
         "everything there), 'pos >= size' after evictions start. Full cache: every token, for reference."),
        "", stream_table, "", *[f"![cache {C}](stream_loss_{C}.png) ![gap {C}](stream_gap_{C}.png)" for C in sizes], "",
        f"## Decode policies at {long_len} tokens (CPU)", "",
        (f"{cfg.train.eval_batches} passkey samples per length at evenly spread depths (the shorter lengths "
         "show whether the model retrieves at all); accuracy = every greedy answer "
         f"token right. Tokens/s: median over samples of {TIMED_STEPS} decode steps (one jitted scan) after a "
         f"compiling call; 'x full' is the ratio to full attention in this process. KV bytes: what the "
         f"policy's caches hold (selectors read a subset of the full cache; the streaming cache holds "
         f"{cfg.data.seq_len} slots)."),
        "", pol_table, "",
        "| claim | held at this scale |", "|---|---|",
        *[f"| {k} | {'yes' if ok else 'no'} |" for k, ok in claims.items()], "",
        f"Wall time: {seconds:.0f} s (train {t_train:.0f}, streaming {t_stream:.0f}, policies {t_pol:.0f}).", ""]
    (run_dir / "report.md").write_text("\n".join(report))
    write_json(run_dir / "result.json", result)
    log(f"{cfg.name}: report {run_dir / 'report.md'} ({seconds:.0f} s)")
    return result


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
