"""Sparse attention on CPU: the XLA gather path of kernels.sparse_attention (window 512 + 4 sinks,
and HiP with a budget of 8 blocks) against dense causal jax.nn.dot_product_attention, causal,
8 heads, head dim 64, batch 1, at T = 4K, 16K, 32K. Ratios are against the anchor measured in
this process. `python tools/bench.py attention [--quick] [--max-dense-t N]`.

Dense attention materializes [T, T] logits per head; above --max-dense-t (default 16384) it is
not run (32K would need ~12 GB and minutes on 2 cores) and its time is extrapolated
quadratically from the largest measured T, marked "extrapolated" in the output."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from horizon.attention import policies
from kernels.sparse_attention import attend
from tools.benches._timing import machine, time_fn

_H, _D, _B, _BLOCK = 8, 64, 1, 64


def _dense(q, k, v):
    # One head at a time (lax.map) bounds memory to one head's [T, T] logits; same math.
    def one(args):
        qh, kh, vh = args
        return jax.nn.dot_product_attention(
            qh[:, :, None], kh[:, :, None], vh[:, :, None], is_causal=True
        )[:, :, 0]

    out = jax.lax.map(one, (jnp.moveaxis(q, 2, 0), jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0)))
    return jnp.moveaxis(out, 0, 2)


def _sinks(t):
    sel = policies.sinks(t, window=512, n_sinks=4, block_q=_BLOCK, block_k=_BLOCK)
    return lambda q, k, v: attend(q, k, v, sel, implementation="xla")


def _hip(t):
    def f(q, k, v):  # the selection (tree search) is part of the timed call
        sel = policies.hip(t, q_BTHD=q, k_BSGD=k, budget=8, block_q=_BLOCK, block_k=_BLOCK)
        return attend(q, k, v, sel, implementation="xla")

    return f


def run(args: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py attention")
    ap.add_argument("--quick", action="store_true", help="T = 1K, 4K only")
    ap.add_argument("--max-dense-t", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=3)
    opt = ap.parse_args(args)
    lengths = [1024, 4096] if opt.quick else [4096, 16384, 32768]
    rows = []
    dense_fn = jax.jit(_dense)
    last_dense = None
    for t in lengths:
        keys = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(keys[0], (_B, t, _H, _D), jnp.float32)
        k = jax.random.normal(keys[1], (_B, t, _H, _D), jnp.float32)
        v = jax.random.normal(keys[2], (_B, t, _H, _D), jnp.float32)
        if t <= opt.max_dense_t:
            # Compiled ahead, so the large dense runs need no warm-up call (16K: ~40 s each).
            compiled = dense_fn.lower(q, k, v).compile()
            big = t >= 16384
            dense_s = time_fn(
                compiled, q, k, v, warmup=0 if big else 1, iters=1 if big else opt.iters
            )
            dense_note = "measured"
            last_dense = (t, dense_s)
        else:
            t0, s0 = last_dense
            dense_s = s0 * (t / t0) ** 2
            dense_note = f"extrapolated (T/{t0})^2 from the measured T={t0}"
        row = {"T": t, "dense_s": dense_s, "dense": dense_note}
        for name, make in (("window512_sinks4", _sinks), ("hip_budget8", _hip)):
            fn = jax.jit(make(t))
            s = time_fn(fn, q, k, v, warmup=1, iters=opt.iters)
            row[f"{name}_s"] = s
            row[f"{name}_speedup"] = dense_s / s
        rows.append(row)
        print(
            f"T={t:6d} dense {dense_s:8.3f} s ({dense_note.split()[0]})  "
            + "  ".join(
                f"{n} {row[n + '_s']:.3f} s ({row[n + '_speedup']:.1f}x)"
                for n in ("window512_sinks4", "hip_budget8")
            ),
            flush=True,
        )
    return {
        "op": "attention",
        "machine": machine(),
        "anchor": "jax.nn.dot_product_attention(is_causal=True), dense, one head at a time",
        "candidate": "kernels.sparse_attention.attend(implementation='xla') with horizon.attention.policies",
        "shape": {"B": _B, "H": _H, "D": _D, "block": _BLOCK, "dtype": "float32"},
        "target": ">= 5x faster at T=16K, the gap widening with T",
        "rows": rows,
    }
