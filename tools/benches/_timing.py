"""Timing helper shared by the benchmarks: median wall time of a jitted call after warm-up."""

import time

import jax
import numpy as np


def time_fn(fn, *args, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of `fn(*args)`, blocking on the result; compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine() -> str:
    import os
    import platform

    dev = jax.devices()[0]
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, {dev.platform}:{dev.device_kind}"
