"""GPU check of kernels.sparse_attention: compiles the Pallas kernels natively, checks forward and
gradients against the dense reference at small shapes, and times the dense-causal forward against
cuDNN (T=8K, D=128, bf16) and a ~10%-dense block-sparse forward against dense cuDNN at T=32K.

    PYTHONPATH=. python3 -m tools.device.sparse_attention --out FILE.json [--interpret --small]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sparse_attention import PallasConfig, Selection, attend, with_transpose
from kernels.sparse_attention.selection import tables_from_masks


def _block_masks(t, bq, bk, *, window=None, sinks=0):
    """Static (live, full) [nQ, nK] block masks of causal (+ window, + sinks) attention."""
    nq, nk = -(-t // bq), -(-t // bk)
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    q_lo, q_hi = i * bq, np.minimum((i + 1) * bq, t) - 1
    k_lo, k_hi = j * bk, np.minimum((j + 1) * bk, t) - 1
    live = k_lo <= q_hi
    full = (k_hi <= q_lo) & (q_hi == (i + 1) * bq - 1) & (k_hi == (j + 1) * bk - 1)
    if window is not None:
        near_live, near_full = q_lo - k_hi < window, q_hi - k_lo < window
        if sinks:
            near_live |= k_lo < sinks
            near_full |= k_hi < sinks
        live, full = live & near_live, full & near_full
    return live, full


def _selection(t, bq, bk, *, window=None, sinks=0, **extra) -> Selection:
    live, full = _block_masks(t, bq, bk, window=window, sinks=sinks)
    kvb, cnt, fc = tables_from_masks(live[None, None], full[None, None])
    pos = np.arange(t, dtype=np.int32)[None]
    sel = Selection(
        kv_blocks=kvb,
        counts=cnt,
        full_counts=fc,
        q_positions=pos,
        k_positions=pos,
        block_q=bq,
        block_k=bk,
        causal=True,
        window=window,
        sink_tokens=sinks,
        **extra,
    )
    return with_transpose(sel)


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _errors(q, k, v, sel, interpret, softcap=None):
    """Max |pallas - reference| of the output and of dq, dk, dv (reference in fp32)."""
    w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)

    def loss(impl, dtype):
        def f(q, k, v):
            o = attend(
                q.astype(dtype),
                k.astype(dtype),
                v.astype(dtype),
                sel,
                implementation=impl,
                interpret=interpret,
                softcap=softcap,
            )
            return jnp.sum(o.astype(jnp.float32) * w), o

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, o_p), g_p = loss("pallas", q.dtype)(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    # The reference in true fp32: XLA:GPU would otherwise run fp32 matmuls in TF32.
    with jax.default_matmul_precision("highest"):
        (_, o_r), g_r = loss("reference", jnp.float32)(f32(q), f32(k), f32(v))
    errs = {"out": float(jnp.max(jnp.abs(f32(o_p) - o_r)))}
    for name, a, b in zip(("dq", "dk", "dv"), g_p, g_r):
        errs[name] = float(jnp.max(jnp.abs(f32(a) - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
    return errs


def check_correctness(interpret: bool, small: bool) -> list[dict]:
    t = 96 if small else 384
    d = 32 if small else 64
    bq = bk = 16 if small else 64
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    out = []
    cases = []
    # (a) dense causal, bf16, GQA 4:2
    cases.append(("dense_causal_bf16", jnp.bfloat16, 2, 4, 2, _selection(t, bq, bk), None, 3e-2))
    # (b) window + sinks, fp32, soft-cap, T not a multiple of the block
    t2 = t - 5
    cases.append(
        (
            "window_sinks_softcap_f32",
            jnp.float32,
            1,
            4,
            4,
            _selection(t2, bq, bk, window=t2 // 3, sinks=3),
            30.0,
            2e-4,
        )
    )
    # (c) per-head random blocks, segments, extra rows with a span, RoPE shifts, fp32
    rng = np.random.default_rng(0)
    h, g = 4, 2
    live, _ = _block_masks(t, bq, bk)
    nq, nk = live.shape
    e = bk + 3
    ne = -(-e // bk)
    live_h = live[None] & (rng.random((h, nq, nk)) < 0.6)
    live_h[:, np.arange(nq), np.minimum(np.arange(nq) * bq // bk, nk - 1)] = True
    live_h = np.concatenate([live_h, rng.random((h, nq, ne)) < 0.7], -1)
    kvb, cnt, fc = tables_from_masks(live_h[None], np.zeros_like(live_h)[None])
    pos = np.arange(t, dtype=np.int32)[None]
    seg = (np.arange(t) >= t // 2).astype(np.int32)[None]
    posd = np.where(seg[0] == 1, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)[None]
    sel_c = with_transpose(
        Selection(
            kv_blocks=kvb,
            counts=cnt,
            full_counts=fc,
            q_positions=posd,
            k_positions=posd,
            q_segment_ids=seg,
            k_segment_ids=seg,
            kv_shift=rng.integers(0, 50, kvb.shape).astype(np.int32),
            rope_inv_freq=(1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32),
            extra_k=_rand(keys[5], (1, e, g, d), jnp.float32),
            extra_v=_rand(keys[6], (1, e, g, d), jnp.float32),
            extra_positions=rng.integers(0, t // 2, (1, e)).astype(np.int32),
            extra_segment_ids=rng.integers(0, 2, (1, e)).astype(np.int32),
            block_q=bq,
            block_k=bk,
            causal=True,
            window=t // 4,
            extra_span=t // 3,
        )
    )
    del pos
    cases.append(("per_head_segments_extra_shift_f32", jnp.float32, 2, h, g, sel_c, None, 2e-4))
    for name, dtype, b, h_, g_, sel, cap, tol in cases:
        tt = int(sel.q_positions.shape[1])
        try:
            q = _rand(keys[0], (b, tt, h_, d), dtype)
            k = _rand(keys[1], (b, tt, g_, d), dtype)
            v = _rand(keys[2], (b, tt, g_, d), dtype)
            errs = _errors(q, k, v, sel, interpret, softcap=cap)
            ok = all(x <= tol for x in errs.values())
            out.append({"case": name, "errors": errs, "tol": tol, "pass": ok})
            print(
                f"[{'PASS' if ok else 'FAIL'}] {name}: "
                + ", ".join(f"{k_}={x:.2e}" for k_, x in errs.items())
            )
        except Exception as exc:  # noqa: BLE001 (one failure must not hide the others)
            out.append(
                {"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000], "pass": False}
            )
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return out


def _time(fn, *args, iters=10):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _dense_anchor(q, k, v, interpret):
    impl = None if interpret else "cudnn"
    return jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    )


# Launch configurations tried by --tune: (block_q, block_k, num_warps, num_stages).
# Measured on an H200 (jax 0.11): (128, 64, 4, 3|4) led; 8 warps or 2 stages were 10-40% slower.
_TUNE = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
# Without --tune each case tries its two best configurations from those sweeps and keeps the faster.
_DEFAULTS = {
    "dense_causal": [(128, 64, 4, 3), (128, 64, 4, 4)],
    "sparse_10pct": [(128, 64, 4, 4), (64, 64, 4, 4)],
}


def bench(interpret: bool, small: bool, tune: bool, backward: bool) -> list[dict]:
    rows = []
    dtype = jnp.bfloat16
    specs = [  # name, B, T, H, D
        ("dense_causal", 4, 512 if small else 8192, 4 if small else 16, 32 if small else 128),
        ("sparse_10pct", 1, 1024 if small else 32768, 2 if small else 16, 32 if small else 128),
    ]
    iters = 3 if small else 10
    for name, b, t, h, d in specs:
        try:
            keys = jax.random.split(jax.random.PRNGKey(1), 3)
            q, k, v = (_rand(kk, (b, t, h, d), dtype) for kk in keys)
            t_ref = _time(_dense_anchor(q, k, v, interpret), q, k, v, iters=iters)
            causal_flops = 4 * b * h * d * t * (t + 1) / 2
            configs = [(32, 32, 4, 2)] if small else (_TUNE if tune else _DEFAULTS[name])
            best = None
            for bq, bk, nw, ns in configs:
                if name == "dense_causal":
                    sel = _selection(t, bq, bk)
                n_causal = sum(
                    min(-(-t // bk), -(-((i + 1) * bq) // bk)) for i in range(-(-t // bq))
                )
                if (
                    name != "dense_causal"
                ):  # window + sinks: the window whose density is nearest 10%

                    def off_10pct(w, t=t, bq=bq, bk=bk, n_causal=n_causal):
                        live = _block_masks(t, bq, bk, window=w, sinks=64)[0]
                        return abs(float(live.sum()) / n_causal - 0.10)

                    w = min(range(bk, t // 4, bk), key=off_10pct)
                    sel = _selection(t, bq, bk, window=w, sinks=64)
                density = float(np.asarray(sel.counts).sum()) / n_causal
                cfg = PallasConfig(num_warps=nw, num_stages=ns)
                ours = jax.jit(
                    lambda q, k, v, sel=sel, cfg=cfg: attend(
                        q, k, v, sel, implementation="pallas", interpret=interpret, config=cfg
                    )
                )
                t_ours = _time(ours, q, k, v, iters=iters)
                row = {
                    "case": name,
                    "B": b,
                    "T": t,
                    "H": h,
                    "D": d,
                    "dtype": "bfloat16",
                    "block_q": bq,
                    "block_k": bk,
                    "num_warps": nw,
                    "num_stages": ns,
                    "density_of_causal_blocks": round(density, 4),
                    "pallas_ms": t_ours * 1e3,
                    "cudnn_dense_ms": t_ref * 1e3,
                    "pallas_tflops_dense_equiv": causal_flops / t_ours / 1e12,
                    "cudnn_tflops": causal_flops / t_ref / 1e12,
                    "speed_vs_cudnn": t_ref / t_ours,
                    "target": ">=0.7x" if name == "dense_causal" else ">=5x faster",
                }
                rows.append(row)
                print(
                    f"{name:13s} T={t:6d} bq={bq} bk={bk} w={nw} s={ns}: pallas {t_ours * 1e3:8.3f} ms "
                    f"cudnn {t_ref * 1e3:8.3f} ms  speed {t_ref / t_ours:5.2f}x  "
                    f"(pallas {row['pallas_tflops_dense_equiv']:.0f} TFLOP/s dense-equiv, cudnn "
                    f"{row['cudnn_tflops']:.0f}) density {density:.3f}"
                )
                if best is None or t_ours < best[0]:
                    best = (t_ours, sel, cfg)
            if backward and name == "dense_causal":
                _, sel, cfg = best
                gw = jax.random.normal(keys[0], q.shape, jnp.float32).astype(dtype)
                ref_b = jax.jit(
                    jax.grad(
                        lambda q, k, v, gw=gw: (
                            jnp.vdot(
                                jax.nn.dot_product_attention(
                                    q,
                                    k,
                                    v,
                                    is_causal=True,
                                    implementation=None if interpret else "cudnn",
                                ),
                                gw,
                            ).real
                        ),
                        argnums=(0, 1, 2),
                    )
                )
                tr = _time(ref_b, q, k, v, iters=iters)
                for bw, bs_ in [(None, 2)] if small or not tune else [(8, 2), (4, 3)]:
                    cfg_b = PallasConfig(
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        bwd_num_warps=bw,
                        bwd_num_stages=bs_,
                    )
                    ours_b = jax.jit(
                        jax.grad(
                            lambda q, k, v, cfg_b=cfg_b, sel=sel, gw=gw: (
                                jnp.vdot(
                                    attend(
                                        q,
                                        k,
                                        v,
                                        sel,
                                        implementation="pallas",
                                        interpret=interpret,
                                        config=cfg_b,
                                    ),
                                    gw,
                                ).real
                            ),
                            argnums=(0, 1, 2),
                        )
                    )
                    tb = _time(ours_b, q, k, v, iters=iters)
                    rows.append(
                        {
                            "case": "dense_causal_fwd+bwd",
                            "T": t,
                            "bwd_num_warps": bw,
                            "bwd_num_stages": bs_,
                            "pallas_ms": tb * 1e3,
                            "cudnn_ms": tr * 1e3,
                            "speed_vs_cudnn": tr / tb,
                        }
                    )
                    print(
                        f"fwd+bwd dense T={t} bwd w={bw} s={bs_}: pallas {tb * 1e3:.3f} ms "
                        f"cudnn {tr * 1e3:.3f} ms speed {tr / tb:.2f}x"
                    )
        except Exception as exc:  # noqa: BLE001 (one failure must not hide the others)
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"[ERROR] bench {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sparse_attention.json")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="run the kernels in interpret mode (CPU smoke test)",
    )
    ap.add_argument("--small", action="store_true", help="tiny shapes (with --interpret)")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--tune", action="store_true", help="sweep launch configurations")
    ap.add_argument(
        "--skip-backward", action="store_true", help="do not time dense fwd+bwd against cuDNN"
    )
    args = ap.parse_args(argv)
    if not args.interpret and jax.default_backend() != "gpu":
        print(
            f"error: no GPU (backend {jax.default_backend()!r}); run with --interpret --small on CPU"
        )
        return 2
    t0 = time.time()
    result = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "interpret": args.interpret,
    }
    result["correctness"] = check_correctness(args.interpret, args.small)
    if not args.skip_bench:
        result["bench"] = bench(args.interpret, args.small, args.tune, not args.skip_backward)
    if not args.skip_bench:
        best = {}
        for row in result["bench"]:
            case = row["case"]
            if (
                "speed_vs_cudnn" in row
                and case in ("dense_causal", "sparse_10pct")
                and row["speed_vs_cudnn"] > best.get(case, {}).get("speed_vs_cudnn", 0)
            ):
                best[case] = row
        result["best"] = best
        for name, row in best.items():
            print(
                f"best {name}: {row['speed_vs_cudnn']:.2f}x vs cuDNN (target {row['target']}) with "
                f"block_q={row['block_q']} block_k={row['block_k']} warps={row['num_warps']} stages={row['num_stages']}"
            )
    result["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} in {result['seconds']:.1f} s")
    ok = all(c.get("pass") for c in result["correctness"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
