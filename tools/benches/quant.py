"""Benchmark: an emulated NVFP4 linear layer, forward + backward (all three GEMMs quantized by the
`nvfp4` recipe: 16x16 weights, SR gradients, RHT on wgrad), against the bf16 linear and against
qwix's NVFP4 quantized-training dot, in one process.

`python tools/bench.py quant [--size 2048] [--iters 5]`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from tools.benches._timing import machine, time_fn


def _bf16_linear(x, w, c):
    y, vjp = jax.vjp(
        lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype), x, w
    )
    return (y, *vjp(c))


def _horizon_linear(recipe):
    from horizon.quant import quantized_dot

    def f(x, w, c, key):
        y, vjp = jax.vjp(lambda x, w: quantized_dot(x, w, recipe, key), x, w)
        return (y, *vjp(c))

    return f


def _qwix_linear(x, w):
    """qwix QT (quantized training) with NVFP4 weights, activations and gradients, as a function
    of (state, x, c). qwix tells weights from activations by shape, so x carries a batch dim."""
    import qwix
    from flax import nnx

    class Linear(nnx.Module):
        def __init__(self, w):
            self.w = nnx.Param(w)

        def __call__(self, x):
            return jnp.dot(x, self.w[...], preferred_element_type=jnp.float32).astype(x.dtype)

    rule = qwix.QtRule(
        module_path=".*",
        weight_qtype="nvfp4",
        act_qtype="nvfp4",
        bwd_qtype="nvfp4",
        tile_size=16,
        bwd_weight_grad_tile_size=16,
        # the activation-gradient GEMM needs its tile size too for nvfp4
        additional_qt_config={"dlhs_tile_size": 16, "drhs_tile_size": 16},
    )
    model = qwix.quantize_model(Linear(w), qwix.QtProvider([rule]), x[None])
    graphdef, state = nnx.split(model)

    def f(state, x, c):
        y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x[None])
        ds, dx = vjp(c[None])
        return y[0], dx[0], ds

    return f, state


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="bench quant")
    p.add_argument("--size", type=int, default=2048, help="M = N = K")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(args)
    from horizon.quant import LinearRecipe, get_recipe, quantize
    from kernels.qmatmul import qmatmul

    n = a.size
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (n, n), jnp.bfloat16)
    w = (jax.random.normal(k2, (n, n)) * n**-0.5).astype(jnp.bfloat16)
    c = jax.random.normal(k3, (n, n), jnp.bfloat16)
    key = jax.random.key(1)
    t = lambda f, *xs: time_fn(jax.jit(f), *xs, iters=a.iters)

    times = {
        "bf16_linear_autodiff": t(_bf16_linear, x, w, c),
        # the same custom VJP with every operand in high precision: three bf16 NT GEMMs, fp32
        # accumulation (XLA:CPU has a fast bf16 path for NN/NT layouts, not for TN)
        "bf16_linear_nt": t(_horizon_linear(LinearRecipe()), x, w, c, key),
    }
    times["nvfp4_linear"] = t(_horizon_linear(get_recipe("nvfp4").linear), x, w, c, key)
    qwix_error = None
    try:
        fq, state = _qwix_linear(x, w)
        times["qwix_nvfp4_linear"] = t(fq, state, x, c)
    except Exception as e:  # noqa: BLE001 - report, do not hide: the comparison is part of the result
        qwix_error = f"{type(e).__name__}: {e}"
    times["quantize_nvfp4"] = t(lambda x: quantize(x, "nvfp4"), x)
    qx, qw = (
        jax.jit(lambda x: quantize(x, "nvfp4"))(x),
        jax.jit(lambda w: quantize(w, "nvfp4", block=(16, 16)))(w),
    )
    times["qmatmul_nvfp4"] = t(qmatmul, qx, qw)
    # one bf16 GEMM in XLA:CPU's fast layout (NT, fp32 accumulation): 3x this bounds any bf16 linear
    nt = (((1,), (1,)), ((), ()))
    times["bf16_gemm_nt"] = t(
        lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.float32), x, w
    )

    bf16 = min(times["bf16_linear_autodiff"], times["bf16_linear_nt"])  # the faster anchor
    ratios = {
        "nvfp4_vs_bf16": times["nvfp4_linear"] / bf16,
        "nvfp4_vs_bf16_autodiff": times["nvfp4_linear"] / times["bf16_linear_autodiff"],
        "nvfp4_vs_bf16_nt": times["nvfp4_linear"] / times["bf16_linear_nt"],
    }
    if "qwix_nvfp4_linear" in times:
        ratios["nvfp4_vs_qwix"] = times["nvfp4_linear"] / times["qwix_nvfp4_linear"]
    ratios["qmatmul_vs_bf16_gemm_nt"] = times["qmatmul_nvfp4"] / times["bf16_gemm_nt"]
    ratios["nvfp4_vs_3_bf16_gemms"] = times["nvfp4_linear"] / (3 * times["bf16_gemm_nt"])
    targets = {
        "nvfp4_vs_bf16 <= 2.5": ratios["nvfp4_vs_bf16"] <= 2.5,
        "nvfp4_vs_qwix < 1": ratios.get("nvfp4_vs_qwix", float("inf")) < 1.0,
    }
    return {
        "op": "quant",
        "machine": machine(),
        "jax": jax.__version__,
        "shape": {"M": n, "N": n, "K": n},
        "what": "linear forward + backward (y, dx, dw), jitted; emulated NVFP4 = bf16 dots of "
        "dequantized operands; nvfp4_vs_bf16 is against the faster bf16 anchor",
        "seconds": {k: round(v, 5) for k, v in times.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets_met": targets,
        "qwix_note": qwix_error
        or "qwix QtRule nvfp4 weights/acts/grads, tile 16, RNE grads, no RHT, one-level E4M3 scales",
    }
