"""Static SASS of the Pallas Triton kernels, on a machine without a GPU.

jax lowers a jitted function for CUDA on any host (cross-platform lowering); this tool captures
the Triton IR of each pallas_call there, compiles it for sm_90 with the `triton` package (its wheel
bundles ptxas and nvdisasm: `pip install triton`, not a project dependency) and counts the
instructions one thread issues: the main path (the fp32-division slow-path calls, taken only for
extreme operands, left out) and the body of the hottest loop. A proxy for compute-bound kernels,
not a timing: the H200 numbers come from tools/device_check.sh.

    PYTHONPATH=. python -m tools.sass quantize   # fused NVFP4 quantize: fp8 rounding paths
    PYTHONPATH=. python -m tools.sass gemv       # weight-only NVFP4 GEMV tilings and decoders
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)")
_LABEL = re.compile(r"\s*(\.L_x_\d+):")


@contextlib.contextmanager
def _capturing_ttir(out: list[str]):
    """Append the Triton IR text of every pallas_call lowered inside the block to `out`."""
    from jax._src.pallas.triton import lowering

    orig = lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = orig(*args, **kwargs)
        out.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield
    finally:
        lowering.lower_jaxpr_to_triton_module = orig


def ttir_of(fn, *args) -> list[str]:
    """Triton IR of each pallas_call in jit(fn)(*args) lowered for CUDA (args may be avals)."""
    captured: list[str] = []
    with _capturing_ttir(captured):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return captured


def sass_of(ttir: str, *, num_warps: int, num_stages: int, arch: int = 90) -> str:
    """nvdisasm listing of the TTIR compiled by Triton for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.ttir")
        with open(src, "w") as f:
            f.write(ttir)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
        cubin = os.path.join(d, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        return subprocess.run(
            [nvdisasm, "-c", cubin], capture_output=True, text=True, check=True
        ).stdout


@dataclasses.dataclass(frozen=True)
class SassSummary:
    main: int  # instructions up to the last EXIT
    executed: int  # main minus the skipped slow-path call blocks
    loop: int  # instructions in the largest backward-branch loop (0: none)
    loop_ops: tuple[tuple[str, int], ...]  # its opcode histogram, commonest first
    ops: tuple[tuple[str, int], ...]  # the main path's opcode histogram


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip())
    return text.split()[0].split(".")[0] if text else ""


def summarize(sass: str) -> SassSummary:
    """Count a kernel's main-path and loop instructions (see the module docstring)."""
    lines = sass.splitlines()
    instrs, labels = [], {}
    for i, line in enumerate(lines):
        m = _INSTR.match(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2), i))
        elif (m := _LABEL.match(line)) is not None:
            labels[m.group(1)] = i
    label_addr = {
        name: next((a for a, _, j in instrs if j > i), None) for name, i in labels.items()
    }
    last_exit = max(a for a, t, _ in instrs if "EXIT" in t)
    main = [(a, t) for a, t, _ in instrs if a <= last_exit]
    # A division's fast path ends in `@!P BRA` over a block that calls the slow path: skip it.
    skipped, inside = 0, False
    for _, t in main:
        if re.search(r"@!P\d BRA", t):
            inside = True
            continue
        if inside:
            if "BSYNC" in t:
                inside = False
            else:
                skipped += 1
    loop = (0, 0, -1)
    for a, t, _ in instrs:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", t)
        target = label_addr.get(m.group(1)) if m else None
        if target is not None and target < a:
            n = sum(1 for b, _, _ in instrs if target <= b <= a)
            loop = max(loop, (n, target, a))
    n_loop, lo, hi = loop
    loop_ops = collections.Counter(_opcode(t) for a, t, _ in instrs if lo <= a <= hi)
    ops = collections.Counter(_opcode(t) for _, t in main)
    return SassSummary(
        main=len(main),
        executed=len(main) - skipped,
        loop=n_loop,
        loop_ops=tuple(loop_ops.most_common(12)),
        ops=tuple(ops.most_common(12)),
    )


# ----------------------------------------------------------------------------- kernels


def quantize_variants():
    """(name, fn, args, warps, stages, elements per thread) of the NVFP4 quantize benchmark tile."""
    from kernels.qmatmul import quantize_pallas as qp
    from kernels.qmatmul.config import QuantizeConfig

    x = jax.ShapeDtypeStruct((1024, 4096), jnp.bfloat16)
    key = jax.random.key(0)
    for hw, fast in ((False, False), (True, False), (True, True)):
        cfg = QuantizeConfig(
            block_rows=16, block_cols=256, num_warps=4, num_stages=1, hw_fp8=hw, fast_div=fast
        )
        for name, kw in (
            ("rne", {"rounding": "rne"}),
            ("sr", {"rounding": "stochastic", "key": key}),
            ("rht+sr", {"rounding": "stochastic", "key": key, "rht_seed": 0}),
        ):

            def fn(v, cfg=cfg, kw=kw):
                return qp.quantize(v, "nvfp4", packed=True, config=cfg, **kw)

            per_thread = 16 * 256 // (32 * cfg.num_warps)
            yield f"quantize nvfp4 {name} hw_fp8={hw} fast_div={fast}", fn, (x,), 4, 1, per_thread


def gemv_variants():
    """Weight-only NVFP4 GEMV (bf16 x[1, K] . packed w[N, K]^T) under the decode configs."""
    from kernels.qmatmul import api, pallas_triton
    from kernels.qmatmul.config import pick_matmul_config
    from kernels.qmatmul.packed import PackedQTensor

    n = k = 4096
    x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
    codes = jax.ShapeDtypeStruct((n, k // 2), jnp.uint8)
    scales = jax.ShapeDtypeStruct((n, k // 16), jnp.uint8)
    ts = jax.ShapeDtypeStruct((), jnp.float32)
    base = pick_matmul_config(1, 16384, 16384, on_gpu=True)
    for over in (
        {},
        {"unpack": "join"},
        {"decode": "bf16"},
        {"decode": "f16x2"},
        {"decode": "f16x2", "block_n": 128},
        {"decode": "f16x2", "block_k": 256},
        {"decode": "f16x2", "block_n": 128, "num_warps": 8},
    ):
        cfg = dataclasses.replace(base, **over)

        def fn(x, c, s, t, cfg=cfg):
            w = PackedQTensor(c, s, t, "nvfp4", (1, 16))
            if cfg.decode == "f16x2":
                return api._gemv_f16(x, w, cfg, interpret=False)
            a_spec, a_arr, tsa, _ = api._operand(x)
            b_spec, b_arr, tsb, _ = api._operand(w)
            return pallas_triton.qmatmul_pallas(
                a_arr,
                b_arr,
                tsa * tsb,
                a_spec=a_spec,
                b_spec=b_spec,
                k=k,
                cfg=cfg,
                compute_dtype=jnp.bfloat16,
            )

        per_thread = cfg.block_n * cfg.block_k // (32 * cfg.num_warps)  # weight elements per step
        label = ",".join(f"{key}={v}" for key, v in over.items()) or "default"
        yield (
            f"gemv {label} {cfg.decode}/{cfg.unpack}",
            fn,
            (x, codes, scales, ts),
            cfg.num_warps,
            cfg.num_stages,
            per_thread,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=("quantize", "gemv"))
    p.add_argument("--dump", help="directory to write each variant's SASS into")
    args = p.parse_args(argv)
    variants = quantize_variants() if args.kernel == "quantize" else gemv_variants()
    for name, fn, fn_args, warps, stages, per_thread in variants:
        [ttir] = ttir_of(fn, *fn_args)[-1:]
        sass = sass_of(ttir, num_warps=warps, num_stages=stages)
        s = summarize(sass)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, re.sub(r"\W+", "_", name) + ".sass"), "w") as f:
                f.write(sass)
        body = s.loop if args.kernel == "gemv" else s.executed
        print(
            f"{name:42s} executed {s.executed:5d}  loop {s.loop:5d}  "
            f"= {body / per_thread:5.1f} per element ({per_thread} per thread)",
            flush=True,
        )
        top = s.loop_ops if args.kernel == "gemv" else s.ops
        print("    " + ", ".join(f"{o}:{c}" for o, c in top))


if __name__ == "__main__":
    main()
