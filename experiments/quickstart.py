"""Quickstart: a ~1.1M-parameter byte-level LM trained on the Python standard library.

Claim: a small decoder LM learns the corpus well beyond its byte-unigram statistics within a few
hundred steps on a CPU, i.e. its held-out loss (bits per byte) ends well below the corpus's
byte-unigram entropy.
"""

from __future__ import annotations

import math

import numpy as np

from horizon.config import Data, Experiment, Model, Optim, Train
from horizon.data.tokenizer import get_tokenizer
from horizon.eval.report import markdown_table, plot_curves, write_json
from horizon.infer.generate import sample
from horizon.train.loop import train

CONFIG = Experiment(
    name="quickstart",
    claim="a ~1.1M-parameter byte LM's held-out loss ends well below the corpus byte-unigram entropy",
    model=Model(d_model=128, n_layers=6, n_heads=4, n_kv_heads=2),
    data=Data(seq_len=256, batch_size=8),
    optim=Optim(lr=3e-3, warmup_steps=30),
    train=Train(steps=300, log_every=10, eval_every=100, checkpoint_every=100),
)


def unigram_entropy_bits(tokens: np.ndarray, vocab: int = 256) -> float:
    """Entropy of the byte distribution, in bits per byte."""
    p = np.bincount(tokens.astype(np.int64), minlength=vocab).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def run(cfg: Experiment = CONFIG) -> dict:
    res = train(cfg)
    LN2 = math.log(2.0)
    train_tokens = res.store.tokens  # entropy of the whole corpus's bytes
    h_unigram = unigram_entropy_bits(train_tokens)
    eval_bpb = res.final_eval_loss / LN2 if res.final_eval_loss is not None else float("nan")
    losses = [(r["step"], r["loss"] / LN2) for r in res.history if "loss" in r]
    evals = [(r["step"], r["eval_loss"] / LN2) for r in res.history if "eval_loss" in r]
    tok = get_tokenizer()
    prompt = tok.encode("def ")
    text = tok.decode(sample(res.model, prompt, max_new_tokens=160, temperature=0.7, window=cfg.data.seq_len))
    plot_curves(res.run_dir / "loss.png",
                {"train": tuple(zip(*losses)), "held-out": tuple(zip(*evals)) if evals else ((), ())},
                xlabel="step", ylabel="bits per byte", title="quickstart",
                hlines={"byte-unigram entropy": h_unigram})
    reproduced = eval_bpb < 0.75 * h_unigram
    result = {
        "n_params": res.n_params,
        "steps": res.history[-1]["step"] if res.history else 0,
        "heldout_bits_per_byte": eval_bpb,
        "unigram_entropy_bits_per_byte": h_unigram,
        "reproduced": bool(reproduced),
        "sample": text,
    }
    tps = [r["tokens_per_s"] for r in res.history if "tokens_per_s" in r]
    report = [
        f"# {cfg.name}", "", f"Claim: {cfg.claim}.", "",
        markdown_table(["quantity", "value"], [
            ["parameters", res.n_params],
            ["steps", result["steps"]],
            ["held-out loss (bits/byte)", eval_bpb],
            ["byte-unigram entropy (bits/byte)", h_unigram],
            ["median tokens/s", float(np.median(tps)) if tps else float("nan")],
        ]), "",
        f"Reproduced (held-out < 0.75 x unigram entropy): **{'yes' if reproduced else 'no'}**.", "",
        "![loss](loss.png)", "", "Sample (prompt `def `, temperature 0.7):", "", "```", "def " + text, "```", "",
    ]
    (res.run_dir / "report.md").write_text("\n".join(report))
    write_json(res.run_dir / "result.json", result)
    print(f"{cfg.name}: {res.n_params} params, held-out {eval_bpb:.3f} bits/byte vs unigram "
          f"{h_unigram:.3f}; report: {res.run_dir / 'report.md'}")
    return result


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
