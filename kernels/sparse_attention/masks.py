"""Element masks and the RoPE key shift of a Selection, written once in jnp and used by the
reference, the XLA path and inside the Pallas kernels (elementwise ops lower to Triton as is).
RoPE: Su et al., RoFormer (2021), rotate-half convention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def element_mask(
    q_pos,
    k_pos,
    *,
    q_seg=None,
    k_seg=None,
    is_extra=False,
    k_valid=None,
    causal: bool,
    window: int | None,
    sink_tokens: int,
    extra_span: int | None,
):
    """Allowed (query, key) pairs; q_* broadcast against k_* (e.g. [bq, 1] and [1, bk]).

    is_extra: Python bool or bool array broadcastable to the result (key is an extra row).
    k_valid: key rows that exist (not padding), or None.
    """
    ok = None

    def _and(a, b):
        return b if a is None else a & b

    if k_valid is not None:
        ok = _and(ok, k_valid)
    if q_seg is not None:
        ok = _and(ok, q_seg == k_seg)
    diff = q_pos - k_pos
    if causal:
        ok = _and(ok, diff >= 0)
    main_ok = None
    if window is not None:
        main_ok = diff < window if causal else (diff < window) & (diff > -window)
        if sink_tokens:
            main_ok = main_ok | (k_pos < sink_tokens)
    extra_ok = None
    if extra_span is not None:
        extra_ok = (diff >= 0) & (diff < extra_span)
    if main_ok is not None or extra_ok is not None:
        # Boolean algebra instead of where(): lowers the same everywhere, Triton included.
        if isinstance(is_extra, bool):
            sel = extra_ok if is_extra else main_ok
        elif main_ok is None:
            sel = ~is_extra | extra_ok
        elif extra_ok is None:
            sel = is_extra | main_ok
        else:
            sel = (is_extra & extra_ok) | (~is_extra & main_ok)
        if sel is not None:
            ok = _and(ok, sel)
    if ok is None:
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(k_pos)), bool)
    return ok


def rotate_half_matrix(d: int) -> np.ndarray:
    """P with x @ P == concat([-x2, x1]) for x = concat([x1, x2]) (rotate-half RoPE)."""
    h = d // 2
    p = np.zeros((d, d), np.float32)
    p[np.arange(h) + h, np.arange(h)] = -1.0
    p[np.arange(h), np.arange(h) + h] = 1.0
    return p


def rope_freqs_full(inv_freq, d: int):
    """[D] frequencies for the rotate-half layout: inv_freq [D//2] repeated, zero-padded to d."""
    f = jnp.concatenate([inv_freq, inv_freq]).astype(jnp.float32)
    return jnp.pad(f, (0, d - f.shape[0]))


def shift_keys(k, shift, freqs_d):
    """Rotate keys k [..., D] by RoPE of `shift` positions ([...] broadcast over rows), in fp32.

    k' = k * cos(shift * f) + rotate_half(k) * sin(shift * f): the key as if at position + shift.
    """
    kf = k.astype(jnp.float32)
    ang = shift[..., None].astype(jnp.float32) * freqs_d
    h = kf.shape[-1] // 2
    rot = jnp.concatenate([-kf[..., h:], kf[..., :h]], axis=-1)
    return (kf * jnp.cos(ang) + rot * jnp.sin(ang)).astype(k.dtype)
