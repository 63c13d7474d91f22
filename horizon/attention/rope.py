"""Rotary position embedding (Su et al., 2021, RoFormer, eq. 34), rotate-half convention, and the
frequency scalings that extend a trained context: position interpolation (Chen et al., 2023),
NTK-aware and dynamic NTK (bloc97 / emozilla, 2023; YaRN §3.1, §3.3), YaRN (Peng et al., 2023).

Pair i of a head rotates by angle position * theta_i with theta_i = base^(-2i/D). Every scaling
only changes theta_i (and, for YaRN, a scale on q and k); a larger base (ProLong, Gao et al.,
2024: 8e6 at 64K) is `Model.rope_theta` itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from horizon.config import Rope


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/D) for i in [0, D/2), float32 [D/2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def ntk_theta(theta: float, factor, head_dim: int):
    """NTK-aware base: b' = b * s^(D / (D - 2)) (YaRN §3.1), so the lowest frequency is interpolated
    by exactly s while the highest is left (almost) unchanged."""
    return theta * factor ** (head_dim / (head_dim - 2))


def yarn_ramp(r: jax.Array, alpha: float, beta: float) -> jax.Array:
    """gamma(r) of YaRN §3.2 (NTK-by-parts): 0 below alpha rotations per trained length, 1 above
    beta, linear in between."""
    return jnp.clip((r - alpha) / (beta - alpha), 0.0, 1.0)


def yarn_attention_scale(factor: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (YaRN §3.4), applied to both q and k so logits scale by 1/t."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def scaled_inverse_frequencies(head_dim: int, theta: float, cfg: Rope,
                               length: jax.Array | int | None = None) -> tuple[jax.Array, float]:
    """(inverse frequencies float32 [D/2], q/k scale) for the scaling `cfg`.

    none: theta_i.  linear (PI, Chen et al., 2023, §2.2): positions divided by s, i.e. theta_i / s.
    ntk: theta_i from the base ntk_theta(b, s).  dynamic_ntk (YaRN §3.3): ntk with
    s = max(1, length / L) for the current `length` (the largest position + 1; may be traced).
    yarn (§3.2-3.4): theta_i' = (1 - gamma(r_i)) theta_i / s + gamma(r_i) theta_i with
    r_i = L theta_i / (2 pi), and q, k scaled by 0.1 ln s + 1.
    """
    base = inverse_frequencies(head_dim, theta)
    kind, s = cfg.scaling, float(cfg.factor)
    if kind == "none":
        return base, 1.0
    if kind == "linear":
        return base / s, 1.0
    if kind == "ntk":
        return inverse_frequencies(head_dim, ntk_theta(theta, s, head_dim)), 1.0
    if kind == "dynamic_ntk":
        assert length is not None, "dynamic_ntk needs the current length"
        s_dyn = jnp.maximum(1.0, jnp.asarray(length, jnp.float32) / cfg.original_length)
        exps = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        return 1.0 / (ntk_theta(theta, s_dyn, head_dim) ** exps), 1.0
    if kind == "yarn":
        r = cfg.original_length * base / (2 * math.pi)  # rotations of pair i over the trained length
        gamma = yarn_ramp(r, cfg.yarn_alpha, cfg.yarn_beta)
        return (1.0 - gamma) * base / s + gamma * base, yarn_attention_scale(s)
    raise AssertionError(kind)  # Rope.__post_init__ rejects unknown kinds


def rope_for_positions(head_dim: int, theta: float, cfg: Rope,
                       positions_BT: jax.Array) -> tuple[jax.Array, float]:
    """scaled_inverse_frequencies for a batch of positions (dynamic NTK reads its length from them)."""
    length = jnp.max(positions_BT) + 1 if cfg.scaling == "dynamic_ntk" else None
    return scaled_inverse_frequencies(head_dim, theta, cfg, length)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array,
               scale: float = 1.0) -> jax.Array:
    """Rotate the two halves of each head's features by position * inv_freq (angles in fp32),
    times `scale` (YaRN's attention temperature; 1.0 leaves the rotation untouched)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)
