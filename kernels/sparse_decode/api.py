"""kernels.sparse_decode.decode_attend: the public sparse decode attention. Validates shapes, dtypes
and page sizes at trace time (KernelInputError), then dispatches to the split-K Pallas kernel, the
XLA gather path or the dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.dispatch import IMPLEMENTATIONS  # noqa: F401  (re-exported)
from kernels.dispatch import resolve_implementation as _resolve
from kernels.errors import KernelInputError, check_qkv
from kernels.sparse_decode import pallas_triton
from kernels.sparse_decode.reference import decode_reference
from kernels.sparse_decode.xla import decode_xla

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_implementation(implementation: str | None, interpret: bool = False) -> str:
    """The implementation `decode_attend` runs: None picks pallas on GPU (or interpret=True), else xla."""
    return _resolve("decode_attend", implementation, interpret)


def decode_attend(
    q_BHD,
    k_cache_BSGD,
    v_cache_BSGD,
    indices_BHsK,
    counts_BHs,
    *,
    page_size: int = 1,
    lengths_B=None,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    n_splits: int | None = None,
    config: pallas_triton.DecodeConfig | None = None,
):
    """Decode attention over selected cache slots: out [B, H, D].

    q_BHD: one query token per sequence. k_cache_BSGD, v_cache_BSGD: the KV cache of capacity S
    with G kv heads (H a multiple of G). indices_BHsK [1 or B, Hs, K] int: per row, K entries
    naming cache slots (page_size=1) or pages of page_size consecutive slots (page p = slots
    [p * page_size, (p + 1) * page_size)); Hs = 1 shares one list across heads, Hs = H gives one
    per query head. counts_BHs [1 or B, Hs]: entries [0, count) are live, the rest are ignored.
    Live entries of a row must be distinct. lengths_B [B] (optional): slots >= length are masked.
    scale: logit scale (default D ** -0.5); softcap: logits -> softcap * tanh(logits / softcap).
    A row with no allowed slot gives 0. implementation: None (pallas on GPU, xla on CPU),
    "pallas" (interpret=True runs it on CPU), "xla" (gathers the selected slots) or "reference"
    (dense masked spec). n_splits overrides config.n_splits (splits of the selected slots, merged
    by log-sum-exp).
    """
    impl = resolve_implementation(implementation, interpret)
    config = config or pallas_triton.DecodeConfig()
    _validate(q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, page_size, lengths_B,
              softcap, n_splits, config)
    kw = dict(page_size=page_size, lengths_B=lengths_B, scale=scale, softcap=softcap)
    if impl == "reference":
        return decode_reference(q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, **kw)
    if impl == "xla":
        return decode_xla(q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, **kw)
    if not interpret and jax.default_backend() != "gpu":
        raise KernelInputError(
            f"decode_attend: implementation='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
            "pass interpret=True to run the kernel on CPU, or use implementation='xla'"
        )
    if n_splits is not None:
        config = pallas_triton.DecodeConfig(
            block_k=config.block_k, n_splits=n_splits,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return _decode_pallas(q_BHD, k_cache_BSGD, v_cache_BSGD, indices_BHsK, counts_BHs, page_size,
                          lengths_B, scale, softcap, config, interpret)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _decode_pallas(q, k, v, indices, counts, page_size, lengths, scale, softcap, config, interpret):
    b, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    r = h // g
    hs, kmax = indices.shape[1], indices.shape[2]
    # Row groups: shared indices -> one per kv head (its R query heads share the gathered slots);
    # per-head indices -> one per query head.
    nh, rows = (g, r) if hs == 1 else (h, 1)
    kv_of = (lambda n: n) if hs == 1 else (lambda n: n // r)
    rp, dp = _pow2_at_least_16(rows), _pow2_at_least_16(d)  # Triton dots need >= 16 per side
    qp = jnp.pad(q.reshape(b, nh, rows, d), ((0, 0), (0, 0), (0, rp - rows), (0, dp - d)))
    if dp != d:  # only odd head dims pay for a padded copy of the cache
        k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
    length = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    idx = jnp.broadcast_to(jnp.asarray(indices, jnp.int32), (b, hs, kmax))
    cnt = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (b, hs))
    row = jnp.concatenate(
        [cnt[..., None], jnp.broadcast_to(length[:, None, None], (b, hs, 1)), idx], axis=-1
    )
    n_steps = -(-(kmax * page_size) // config.block_k)
    per_split, n_split = pallas_triton.plan_splits(n_steps, b * nh, config.n_splits)
    st = pallas_triton.Static(
        s=s, page_size=int(page_size), kmax=kmax, block_k=config.block_k, per_split=per_split,
        n_splits=n_split, scale=float(d**-0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap), interpret=bool(interpret),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    acc, m, l = pallas_triton.partials(st, qp, k, v, row, kv_of)
    out = pallas_triton.merge(acc, m, l)  # [B, NH, Rp, Dp]
    return out[:, :, :rows, :d].reshape(b, h, d).astype(q.dtype)


# ------------------------------------------------------------------ validation


def _shape(x):
    return tuple(int(n) for n in x.shape)


def _is_int(x):
    return jnp.issubdtype(jnp.dtype(x.dtype), jnp.integer)


def _validate(q, k, v, indices, counts, page_size, lengths, softcap, n_splits, config):
    name = "decode_attend"
    for arg, x, nd in (("q_BHD", q, 3), ("k_cache_BSGD", k, 4), ("v_cache_BSGD", v, 4)):
        if x.ndim != nd:
            raise KernelInputError(f"{name}: {arg} must be {nd}-D, got shape {_shape(x)}")
        if jnp.dtype(x.dtype) not in _DTYPES:
            raise KernelInputError(f"{name}: {arg} dtype {x.dtype} is not float32, bfloat16 or float16")
    b, h, d = _shape(q)
    _, s, g, _ = _shape(k)
    check_qkv(name, q, k, v, q_name="q_BHD", k_name="k_cache_BSGD", v_name="v_cache_BSGD")
    if not isinstance(page_size, (int, np.integer)) or page_size <= 0:
        raise KernelInputError(f"{name}: page_size={page_size!r} must be a positive int")
    if s % page_size:
        raise KernelInputError(
            f"{name}: cache capacity S={s} is not a multiple of page_size={page_size}; pad the cache to whole pages"
        )
    if indices.ndim != 3 or not _is_int(indices):
        raise KernelInputError(
            f"{name}: indices_BHsK must be a 3-D integer array [1 or B, Hs, K], got shape {_shape(indices)} dtype {indices.dtype}"
        )
    bi, hs, kmax = _shape(indices)
    if bi not in (1, b):
        raise KernelInputError(f"{name}: indices_BHsK has batch {bi}; use 1 (shared) or B={b}")
    if hs not in (1, h):
        raise KernelInputError(f"{name}: indices_BHsK has Hs={hs} heads; use 1 (shared) or H={h}")
    if kmax < 1:
        raise KernelInputError(f"{name}: indices_BHsK has K=0 entries; give at least one (with count 0)")
    if not _is_int(counts) or _shape(counts) != (bi, hs):
        raise KernelInputError(
            f"{name}: counts_BHs must be an integer array of shape {(bi, hs)}, got shape {_shape(counts)} dtype {counts.dtype}"
        )
    if lengths is not None and (not _is_int(lengths) or _shape(lengths) != (b,)):
        raise KernelInputError(
            f"{name}: lengths_B must be an integer array of shape ({b},) or None, got shape {_shape(lengths)} dtype {lengths.dtype}"
        )
    if softcap is not None and softcap <= 0:
        raise KernelInputError(f"{name}: softcap={softcap} must be positive or None")
    if n_splits is not None and (not isinstance(n_splits, (int, np.integer)) or n_splits <= 0):
        raise KernelInputError(f"{name}: n_splits={n_splits!r} must be a positive int or None")
    bk = config.block_k
    if not isinstance(bk, (int, np.integer)) or bk < 16 or bk & (bk - 1):
        raise KernelInputError(f"{name}: config.block_k={bk!r} must be a power of two >= 16")
