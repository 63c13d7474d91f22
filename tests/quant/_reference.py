"""Independent numpy specifications of the formats (ml_dtypes for E4M3/E5M2 rounding, brute-force
nearest search for E2M1), written from the papers, not from horizon/quant."""

import math

import ml_dtypes
import numpy as np

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float64)


def e2m1_code(v) -> np.ndarray:
    """RNE onto the E2M1 grid by brute force: nearest magnitude, ties to the even code."""
    v = np.asarray(v, np.float32)
    m = np.minimum(np.abs(v).astype(np.float64), 6.0)
    d = np.abs(m[..., None] - E2M1_GRID)
    best = d.min(-1, keepdims=True)
    cand = d == best
    # among the (one or two) nearest, prefer an even index
    even = cand & (np.arange(8) % 2 == 0)
    idx = np.where(even.any(-1), even.argmax(-1), cand.argmax(-1))
    return (idx | (np.signbit(v).astype(np.int64) << 3)).astype(np.uint8)


def e2m1_value(codes) -> np.ndarray:
    codes = np.asarray(codes)
    mag = E2M1_GRID[codes & 7]
    return np.where(codes & 8, -mag, mag).astype(np.float32)


def f8_bits(v, dtype) -> np.ndarray:
    return np.asarray(v, np.float32).astype(dtype).view(np.uint8)


def _blocks(x, block_shape):
    """x viewed as (n0, b0, n1, b1) for 2-D x."""
    (r, c), (br, bc) = x.shape, block_shape
    return x.reshape(r // br, br, c // bc, bc)


def nvfp4(x, block_shape):
    """(codes, scale_codes, tensor_scale) of NVFP4 for 2-D x with blocks block_shape."""
    x = np.asarray(x, np.float32)
    amax = np.float32(np.abs(x).max())
    s = np.float32(amax / np.float32(6 * 448))
    if not s > 0:
        s = np.float32(1.0)
    xb = _blocks(x, block_shape)
    amax_b = np.abs(xb).max(axis=(1, 3), keepdims=True).astype(np.float32)
    t = np.minimum((amax_b / np.float32(6.0)).astype(np.float32) / s, np.float32(448)).astype(
        np.float32
    )
    sc = t.astype(ml_dtypes.float8_e4m3fn)
    denom = (sc.astype(np.float32) * s).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(denom > 0, xb / denom, np.float32(0)).astype(np.float32)
    v = np.clip(v, -6, 6)
    codes = e2m1_code(v).reshape(x.shape)
    return codes, sc.view(np.uint8)[:, 0, :, 0], s


def mx(x, elem, block_shape):
    """(codes, e8m0 scale codes) of MX (OCP MX v1.0 sec. 6.3) for 2-D x."""
    x = np.asarray(x, np.float32)
    emax = {"e2m1": 2, "e4m3": 8, "e5m2": 15}[elem]
    fmax = {"e2m1": 6.0, "e4m3": 448.0, "e5m2": 57344.0}[elem]
    xb = _blocks(x, block_shape)
    amax_b = np.abs(xb).max(axis=(1, 3))
    shared = np.empty(amax_b.shape, np.int64)
    for i, a in np.ndenumerate(amax_b):
        shared[i] = (math.frexp(float(a))[1] - 1 - emax) if a > 0 else -127
    shared = np.clip(shared, -127, 127)
    scaled = (xb.astype(np.float64) / np.exp2(shared.astype(np.float64))[:, None, :, None]).astype(
        np.float32
    )
    scaled = np.clip(scaled, -fmax, fmax)
    if elem == "e2m1":
        codes = e2m1_code(scaled)
    else:
        codes = f8_bits(
            scaled, {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[elem]
        )
    return codes.reshape(x.shape), (shared + 127).astype(np.uint8)


def fp8(x):
    x = np.asarray(x, np.float32)
    amax = np.float32(np.abs(x).max())
    s = np.float32(amax / np.float32(448)) if amax > 0 else np.float32(1)
    v = np.clip((x / s).astype(np.float32), -448, 448)
    return f8_bits(v, ml_dtypes.float8_e4m3fn), s
