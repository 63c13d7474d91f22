"""GPU check of kernels.sparse_decode: compiles the split-K Pallas decode kernel natively, checks it
against the dense reference (token and page granularity), and times ~10%-selected decode against
dense decode attention over the whole cache (S=32K and 128K, bf16, H=32, G=8, D=128).

    PYTHONPATH=. python3 -m tools.device.sparse_decode --out FILE.json [--interpret --small]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels.sparse_decode import DecodeConfig, decode_attend


def _inputs(seed, b, h, g, d, s, page_size, k, hs, dtype):
    rng = np.random.default_rng(seed)
    n_pages = s // page_size
    idx = np.stack([[rng.permutation(n_pages)[:k] for _ in range(hs)] for _ in range(b)])
    cnt = rng.integers(k // 2, k + 1, (b, hs))
    lengths = rng.integers(s // 2, s + 1, (b,))
    key = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(key[0], (b, h, d), jnp.float32).astype(dtype)
    kc = jax.random.normal(key[1], (b, s, g, d), jnp.float32).astype(dtype)
    vc = jax.random.normal(key[2], (b, s, g, d), jnp.float32).astype(dtype)
    as32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    return q, kc, vc, as32(idx), as32(cnt), as32(lengths)


def check_correctness(interpret: bool, small: bool) -> list[dict]:
    s = 256 if small else 4096
    d = 32 if small else 128
    cases = [  # name, dtype, B, H, G, page_size, K, Hs, n_splits, tol
        ("token_shared_bf16", jnp.bfloat16, 2, 8, 2, 1, s // 8, 1, None, 2e-2),
        ("page16_per_head_f32", jnp.float32, 2, 8, 2, 16, s // 64, 8, 3, 1e-4),
        ("page64_shared_gqa4_f32", jnp.float32, 1, 8, 2, 64, s // 128, 1, 1, 1e-4),
    ]
    out = []
    for name, dtype, b, h, g, ps, k, hs, ns, tol in cases:
        try:
            q, kc, vc, idx, cnt, ln = _inputs(0, b, h, g, d, s, ps, max(k, 1), hs, dtype)
            f = jax.jit(lambda *a, ps=ps, ns=ns: decode_attend(
                *a[:5], lengths_B=a[5], page_size=ps, implementation="pallas",
                interpret=interpret, n_splits=ns))
            got = f(q, kc, vc, idx, cnt, ln).astype(jnp.float32)
            f32 = lambda x: x.astype(jnp.float32)
            with jax.default_matmul_precision("highest"):
                ref = decode_attend(f32(q), f32(kc), f32(vc), idx, cnt, lengths_B=ln, page_size=ps,
                                    implementation="reference")
            err = float(jnp.max(jnp.abs(got - ref)))
            ok = err <= tol
            out.append({"case": name, "max_abs_error": err, "tol": tol, "pass": ok})
            print(f"[{'PASS' if ok else 'FAIL'}] {name}: max |pallas - reference| = {err:.2e}")
        except Exception as exc:  # noqa: BLE001 (one failure must not hide the others)
            out.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000], "pass": False})
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return out


def _time(fn, *args, iters=10):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _dense(q, kc, vc, ln):
    """Dense decode over the whole cache (masked to the valid length): the anchor."""
    mask = (jnp.arange(kc.shape[1])[None, :] < ln[:, None])[:, None, None, :]
    return jax.nn.dot_product_attention(q[:, None], kc, vc, mask=mask)[:, 0]


def bench(interpret: bool, small: bool) -> list[dict]:
    rows = []
    dtype = jnp.bfloat16
    b, h, g, d = (1, 4, 2, 32) if small else (1, 32, 8, 128)
    lengths = [1024, 2048] if small else [32768, 131072]
    iters = 2 if small else 10
    for s in lengths:
        for ps in (1, 64) if not small else (1, 16):
            name = f"S={s} page_size={ps}"
            try:
                k = s // 10 // ps  # ~10% of the cache selected, shared across heads
                q, kc, vc, idx, cnt, ln = _inputs(1, b, h, g, d, s, ps, k, 1, dtype)
                cnt = jnp.full_like(cnt, k)
                ln = jnp.full_like(ln, s)
                t_dense = _time(jax.jit(_dense), q, kc, vc, ln, iters=iters)
                best = None
                for bk, nw in ([(16, 4)] if small else [(64, 4), (128, 4), (64, 8)]):
                    cfg = DecodeConfig(block_k=bk, num_warps=nw)
                    f = jax.jit(lambda *a, cfg=cfg, ps=ps: decode_attend(
                        *a, page_size=ps, implementation="pallas", interpret=interpret, config=cfg))
                    t = _time(f, q, kc, vc, idx, cnt, iters=iters)
                    if best is None or t < best[0]:
                        best = (t, bk, nw)
                t, bk, nw = best
                moved = 2 * b * g * d * 2 * k * ps  # bytes of selected K and V (bf16)
                dense_moved = 2 * b * g * d * 2 * s
                row = {
                    "case": name, "B": b, "H": h, "G": g, "D": d, "S": s, "page_size": ps,
                    "selected_slots": k * ps, "block_k": bk, "num_warps": nw,
                    "pallas_ms": t * 1e3, "dense_ms": t_dense * 1e3,
                    "pallas_gbps_selected": moved / t / 1e9,
                    "dense_gbps": dense_moved / t_dense / 1e9,
                    "speed_vs_dense": t_dense / t,
                }
                rows.append(row)
                print(f"{name:22s} sel={k * ps:6d} bk={bk:3d} w={nw}: pallas {t * 1e3:7.3f} ms "
                      f"({row['pallas_gbps_selected']:6.0f} GB/s) dense {t_dense * 1e3:7.3f} ms "
                      f"({row['dense_gbps']:6.0f} GB/s) speed {t_dense / t:5.2f}x")
            except Exception as exc:  # noqa: BLE001
                rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(f"[ERROR] bench {name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sparse_decode.json")
    ap.add_argument("--interpret", action="store_true", help="interpret mode (CPU smoke test)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (with --interpret)")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args(argv)
    if not args.interpret and jax.default_backend() != "gpu":
        print(f"error: no GPU (backend {jax.default_backend()!r}); run with --interpret --small on CPU")
        return 2
    t0 = time.time()
    result = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
              "interpret": args.interpret}
    result["correctness"] = check_correctness(args.interpret, args.small)
    if not args.skip_bench:
        result["bench"] = bench(args.interpret, args.small)
    result["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} in {result['seconds']:.1f} s")
    return 0 if all(c.get("pass") for c in result["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
