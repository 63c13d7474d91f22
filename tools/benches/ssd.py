"""SSD benchmark: the chunked XLA scan (kernels.ssd, implementation None on this backend) against
length, with the sequential lax.scan reference and dense causal attention
(jax.nn.dot_product_attention at the same width) as anchors measured in this process.

Reports time per length, the scaling exponent of SSD time in T (log-log least squares; target
<= 1.1) and the ratio to dense attention at each length where dense fits in memory.
Options: --max-len (default 65536), --dense-max-len (default 8192: the XLA attention on CPU
materializes [H, T, T] f32 logits, 2 GiB at 8K, 8 GiB at 16K), --scan-max-len (default 16384),
--heads/--head-dim/--state/--chunk, --dtype float32|bfloat16.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.ssd import resolve_implementation, ssd
from tools.benches._timing import machine


def _fit_exponent(Ts, times) -> float | None:
    if len(Ts) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(Ts, float)), np.log(np.asarray(times, float)), 1)
    return float(slope)


def _best_ms(fn, *args, iters: int) -> float:
    """Best of `iters` timed calls, compile excluded (ahead-of-time). The minimum, not the median:
    this machine is shared, and contention only ever adds time."""
    compiled = jax.jit(fn).lower(*args).compile()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def _iters(T: int) -> int:
    # Long lengths take seconds per call on a laptop-class CPU: fewer repeats there.
    return 5 if T <= 4096 else 3 if T <= 16384 else 2


def run(args: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="tools/bench.py ssd")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=65536)
    ap.add_argument("--dense-max-len", type=int, default=8192)
    ap.add_argument("--scan-max-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--state", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    o = ap.parse_args(args)
    dtype = jnp.dtype(o.dtype)
    H, P, N = o.heads, o.head_dim, o.state
    impl = resolve_implementation(None, o.chunk)

    def ssd_fn(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, chunk=o.chunk)[0]

    def scan_fn(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, implementation="reference")[0]

    def attn_fn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    rows = []
    T = o.min_len
    while T <= o.max_len:
        rng = np.random.default_rng(T)
        x = jnp.asarray(rng.standard_normal((1, T, H, P)), dtype)
        dt = jnp.asarray(rng.uniform(1e-3, 0.1, (1, T, H)), jnp.float32)
        A = -jnp.asarray(rng.uniform(1, 16, H), jnp.float32)
        B = jnp.asarray(rng.standard_normal((1, T, 1, N)), dtype)
        C = jnp.asarray(rng.standard_normal((1, T, 1, N)), dtype)
        row = {"T": T, "ssd_ms": _best_ms(ssd_fn, x, dt, A, B, C, iters=_iters(T))}
        if T <= o.scan_max_len:
            row["scan_ms"] = _best_ms(scan_fn, x, dt, A, B, C, iters=_iters(T))
            row["ssd_speedup_vs_scan"] = row["scan_ms"] / row["ssd_ms"]
        if T <= o.dense_max_len:
            q = k = v = x  # same width: H heads of dim P
            row["dense_attn_ms"] = _best_ms(attn_fn, q, k, v, iters=1 if T >= 8192 else _iters(T))
            row["ssd_over_dense"] = row["ssd_ms"] / row["dense_attn_ms"]
        rows.append(row)
        T *= 2

    Ts = [r["T"] for r in rows]
    ssd_ms = [r["ssd_ms"] for r in rows]
    upper = [i for i, t in enumerate(Ts) if t >= 4096]
    dense = [(r["T"], r["dense_attn_ms"]) for r in rows if "dense_attn_ms" in r]
    notes = [
        f"SSD path: implementation {impl!r} on backend {jax.default_backend()!r}, chunk {o.chunk}, {o.dtype}",
        (f"dense attention measured up to T={o.dense_max_len} (its [H,T,T] f32 logits: "
         f"{4 * H * o.dense_max_len ** 2 / 2 ** 30:.0f} GiB there, x4 per doubling)"),
        f"sequential lax.scan reference measured up to T={o.scan_max_len}",
        "times: best of 2-5 calls (1 for dense at 8K+), compile excluded; the CPU is shared",
    ]
    if o.max_len < 65536:
        notes.append(f"lengths capped at T={o.max_len}")
    return {
        "op": "ssd",
        "machine": machine(),
        "shape": {"batch": 1, "heads": H, "head_dim": P, "state": N, "groups": 1, "chunk": o.chunk,
                  "dtype": o.dtype},
        "rows": rows,
        "ssd_scaling_exponent_all": _fit_exponent(Ts, ssd_ms),
        "ssd_scaling_exponent_T>=4K": _fit_exponent([Ts[i] for i in upper], [ssd_ms[i] for i in upper]),
        "dense_scaling_exponent": _fit_exponent(*zip(*dense)) if len(dense) >= 2 else None,
        "target_exponent": 1.1,
        "notes": notes,
    }
