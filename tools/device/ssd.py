"""GPU device check for kernels.ssd (Mamba-2 SSD): compile the Pallas (Triton) kernel natively,
check it against the sequential reference at small shapes (forward, and gradients through its
recompute VJP), and time it against the XLA chunked path at T = 16K and 64K.

    PYTHONPATH=. python3 -m tools.device.ssd --out ssd.json            # on a GPU
    PYTHONPATH=. python3 -m tools.device.ssd --interpret --small       # CPU smoke test of the code path
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels.ssd import ssd, ssd_reference


def _inputs(seed, batch, T, H, P, G, N, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, T, H, P)), dtype)
    dt = jnp.asarray(rng.uniform(1e-3, 0.1, (batch, T, H)), jnp.float32)
    A = -jnp.asarray(rng.uniform(1.0, 16.0, H), jnp.float32)
    B = jnp.asarray(rng.standard_normal((batch, T, G, N)) / np.sqrt(N), dtype)
    C = jnp.asarray(rng.standard_normal((batch, T, G, N)) / np.sqrt(N), dtype)
    D = jnp.asarray(rng.standard_normal(H), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((batch, H, P, N)), jnp.float32)
    seg = jnp.asarray(np.cumsum(rng.uniform(size=(batch, T)) < 4.0 / T, axis=1), jnp.int32)
    return x, dt, A, B, C, D, h0, seg


def _median_ms(fn, *args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))


def check_forward(interpret: bool, small: bool) -> list[dict]:
    shapes = [  # (name, batch, T, H, P, G, N, dtype, tolerance on max error / max |ref|)
        ("f32 T=300 groups=1 segments", 1, 300, 4, 64, 1, 64, jnp.float32, 1e-4),
        ("bf16 T=1000 groups=2 segments", 2, 1000, 8, 64, 2, 128, jnp.bfloat16, 3e-2),
    ]
    if small:
        shapes = [("f32 T=40 segments", 1, 40, 2, 16, 1, 16, jnp.float32, 1e-4)]
    out = []
    for name, batch, T, H, P, G, N, dtype, tol in shapes:
        row = {"check": f"forward {name}"}
        try:
            x, dt, A, B, C, D, h0, seg = _inputs(T, batch, T, H, P, G, N, dtype)
            fn = jax.jit(lambda *a: ssd(*a[:5], D=a[5], initial_state=a[6], segment_ids=a[7], chunk=64 if not small else 16,
                                        implementation="pallas", interpret=interpret))
            y, h = fn(x, dt, A, B, C, D, h0, seg)
            y_ref, h_ref = jax.jit(ssd_reference)(x.astype(jnp.float32), dt, A, B.astype(jnp.float32),
                                                  C.astype(jnp.float32), D, h0, seg)
            row.update(y_err=_rel_err(y, y_ref), state_err=_rel_err(h, h_ref), tol=tol)
            row["pass"] = bool(row["y_err"] < tol and row["state_err"] < tol)
        except Exception as e:  # noqa: BLE001 (one failure must not hide the other checks)
            row.update({"pass": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        out.append(row)
    return out


def check_grad(interpret: bool, small: bool) -> dict:
    row = {"check": "gradients (Pallas forward + recompute VJP) vs reference, f32"}
    try:
        T = 40 if small else 256
        args = _inputs(1, 1, T, 2, 16 if small else 64, 1, 16 if small else 64, jnp.float32)
        seg = args[-1]

        def loss(impl):
            def f(x, dt, A, B, C, D, h0):
                y, h = ssd(x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg, chunk=16 if small else 64,
                           implementation=impl, interpret=interpret)
                return jnp.sum(y * jnp.cos(y)) + jnp.sum(h * h)
            return jax.jit(jax.grad(f, argnums=tuple(range(7))))

        g = loss("pallas")(*args[:7])
        g_ref = loss("reference")(*args[:7])
        errs = {n: _rel_err(a, b) for n, a, b in zip(("x", "dt", "A", "B", "C", "D", "h0"), g, g_ref)}
        row.update(errors=errs, tol=1e-3, max_err=max(errs.values()))
        row["pass"] = bool(row["max_err"] < 1e-3)
    except Exception as e:  # noqa: BLE001
        row.update({"pass": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    return row


def _cost(batch, T, H, P, G, N, chunk, itemsize):
    flops = batch * T * (H * (2 * chunk * P + 4 * P * N) + G * 2 * chunk * N)
    n_chunks = -(-T // chunk)
    byts = batch * T * (2 * H * P + 2 * G * N) * itemsize + batch * T * H * 4 * 4 + batch * n_chunks * H * P * N * 4 * 4
    return flops, byts


def bench(interpret: bool, small: bool) -> list[dict]:
    H, P, G, N, chunk = 8, 64, 1, 64, 64
    lengths = [256, 512] if small else [16384, 65536]
    iters = 2 if small else 10
    out = []
    for T in lengths:
        row = {"T": T, "batch": 1, "H": H, "P": P, "N": N, "chunk": chunk, "dtype": "bfloat16"}
        try:
            x, dt, A, B, C, D, _, _ = _inputs(T, 1, T, H, P, G, N, jnp.bfloat16)
            fns = {
                impl: jax.jit(lambda x, dt, A, B, C, D, impl=impl: ssd(
                    x, dt, A, B, C, D=D, chunk=chunk, implementation=impl, interpret=interpret))
                for impl in ("pallas", "xla")
            }
            flops, byts = _cost(1, T, H, P, G, N, chunk, 2)
            for impl, fn in fns.items():
                ms = _median_ms(fn, x, dt, A, B, C, D, iters=iters)
                row[f"{impl}_ms"] = ms
                row[f"{impl}_tflops"] = flops / (ms * 1e-3) / 1e12
                row[f"{impl}_gbs"] = byts / (ms * 1e-3) / 1e9
            row["xla_over_pallas"] = row["xla_ms"] / row["pallas_ms"]
            y_p = fns["pallas"](x, dt, A, B, C, D)[0]
            y_x = fns["xla"](x, dt, A, B, C, D)[0]
            row["pallas_vs_xla_err"] = _rel_err(y_p, y_x)
        except Exception as e:  # noqa: BLE001
            row.update({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tools.device.ssd")
    ap.add_argument("--out", default=None)
    ap.add_argument("--interpret", action="store_true", help="run the Pallas kernel in interpret mode (CPU)")
    ap.add_argument("--small", action="store_true", help="small shapes (with --interpret on CPU)")
    a = ap.parse_args(argv)
    t0 = time.time()
    backend = jax.default_backend()
    print(f"jax {jax.__version__} backend={backend} devices={jax.devices()}")
    if backend != "gpu" and not a.interpret:
        print("ERROR: no GPU backend; the native Pallas/Triton kernel cannot run here. "
              "Use --interpret --small to smoke-test the code path on CPU.")
        result = {"op": "ssd", "error": f"no GPU (backend {backend!r})", "pass": False}
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=2)
        return 2

    result = {"op": "ssd", "jax": jax.__version__, "device": str(jax.devices()[0]),
              "interpret": a.interpret, "small": a.small}
    result["forward"] = check_forward(a.interpret, a.small)
    for r in result["forward"]:
        print(f"[{'PASS' if r['pass'] else 'FAIL'}] {r['check']}: y max err/scale {r.get('y_err', float('nan')):.2e}, "
              f"state {r.get('state_err', float('nan')):.2e} (tol {r.get('tol', float('nan')):.0e}) {r.get('error', '')}")
    result["grad"] = check_grad(a.interpret, a.small)
    g = result["grad"]
    print(f"[{'PASS' if g['pass'] else 'FAIL'}] {g['check']}: max err/scale {g.get('max_err', float('nan')):.2e} "
          f"{g.get('error', '')}")
    result["bench"] = bench(a.interpret, a.small)
    print(f"{'T':>7} {'pallas ms':>10} {'xla ms':>9} {'xla/pallas':>10} {'pallas TF/s':>11} {'pallas GB/s':>11} {'err':>8}")
    for r in result["bench"]:
        if "error" in r:
            print(f"{r['T']:>7} ERROR {r['error']}")
            continue
        print(f"{r['T']:>7} {r['pallas_ms']:>10.3f} {r['xla_ms']:>9.3f} {r['xla_over_pallas']:>10.2f} "
              f"{r['pallas_tflops']:>11.2f} {r['pallas_gbs']:>11.1f} {r['pallas_vs_xla_err']:>8.1e}")
    result["pass"] = all(r["pass"] for r in result["forward"]) and g["pass"] and all(
        "error" not in r for r in result["bench"])
    result["seconds"] = time.time() - t0
    print(f"ssd device check: {'PASS' if result['pass'] else 'FAIL'} in {result['seconds']:.1f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
