"""Benchmark: kernels.qmatmul on CPU, where the default path is the XLA dequantize-then-dot
reference. Times it against a plain fp32 dot and a bf16 dot of the same shape, in one process,
for both operands quantized (NVFP4 activations 1x16, weights 16x16) and weight-only (bf16
activations, NVFP4 weights).

`python tools/bench.py qmatmul [--sizes 2048,512] [--iters 5]`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from tools.benches._timing import machine, time_fn


def _nt(a, b, dtype):
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="bench qmatmul")
    p.add_argument("--sizes", default="2048,512", help="comma-separated M = N = K")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(args)
    from horizon.quant import quantize
    from kernels.qmatmul import last_implementation, qmatmul

    out = {"op": "qmatmul", "machine": machine(), "backend": jax.default_backend(), "sizes": {}}
    fp32 = jax.jit(lambda x, w: _nt(x, w, jnp.float32))
    bf16 = jax.jit(lambda x, w: _nt(x, w, jnp.bfloat16))
    default = jax.jit(lambda x, w: qmatmul(x, w))
    for n in (int(s) for s in a.sizes.split(",")):
        k1, k2 = jax.random.split(jax.random.key(n))
        x = jax.random.normal(k1, (n, n))
        w = jax.random.normal(k2, (n, n)) * n**-0.5
        qx = quantize(x, "nvfp4")
        qw = quantize(w, "nvfp4", block=(16, 16))
        t32 = time_fn(fp32, x, w, iters=a.iters)
        t16 = time_fn(bf16, x, w, iters=a.iters)
        tq = time_fn(default, qx, qw, iters=a.iters)
        impl = last_implementation()
        two = time_fn(default, x.astype(jnp.bfloat16), qw, iters=a.iters)
        flops = 2 * n**3
        out["sizes"][str(n)] = {
            "implementation": impl,
            "fp32_dot_ms": t32 * 1e3,
            "bf16_dot_ms": t16 * 1e3,
            "nvfp4_x_nvfp4_ms": tq * 1e3,
            "bf16_x_nvfp4_weight_only_ms": two * 1e3,
            "ratio_nvfp4_to_fp32": tq / t32,
            "ratio_nvfp4_to_bf16": tq / t16,
            "ratio_weight_only_to_fp32": two / t32,
            "fp32_GFLOPs": flops / t32 / 1e9,
        }
    return out
