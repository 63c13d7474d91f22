"""SpaceTime (Zhang et al., "Effectively Modeling Time Series with Simple Discrete State Spaces",
ICLR 2023): the companion-matrix SSM, its convolution kernel in O((d + l) log(d + l)), closed-loop
forecasting, and a small forecasting model.

A = S + p e_d^T (shift matrix S with ones below the diagonal, learned last column p), so A e_j =
e_{j+1} and x(A) e_0 has the coefficients of the polynomial x as coordinates. The kernel
K_j = c^T A^j b is the power series of c^T (I - zA)^{-1} b; with M = I - zS (nilpotent, so
M^{-1} = sum_j z^j S^j) and Woodbury (sec. 3.3):

    c^T (I - zA)^{-1} b = c^T M^{-1} b + z (c^T M^{-1} p)(e_d^T M^{-1} b) / (1 - z e_d^T M^{-1} p)

where every x^T M^{-1} y is a degree < d polynomial (a correlation, one FFT). The kernel's first
l terms are the numerator times the series inverse of the denominator (Newton iteration, FFTs).
Closed-loop forecasting feeds back the predicted next input u_{t+1} = k^T x_t, i.e. evolves with
A + b k^T: a rank-2 Woodbury update of the same formula.

Stability. By the matrix determinant lemma det(zI - A - b k^T) = chi(z) (1 - k^T (zI - A)^{-1} b):
the closed-loop poles are fixed by the open-loop poles and the next-input predictor. The decoder
therefore learns the closed-loop column q directly, with k = e_d and b = q - p, so that
A + b k^T = S + q e_d^T is itself a companion matrix (no loss of generality up to a change of state
basis for a generic predictor, see `closed_loop_feedback`). With ||q||_1 < 1 every root of z^d - sum_i q_i z^i has modulus at
most ||q||_1^(1/d) < 1, and ||S + q e_d^T||_1 = 1 (max column sum), so a rollout of any length
never grows in the l1 norm. The official code instead l1-normalises the rows of A + BK, which only
bounds the spectral radius by 1 and gives up the companion structure the fast kernel needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from horizon.errors import ConfigError, ShapeError
from horizon.layers.params import constant, normal, param

_F32 = jnp.float32


# --- polynomial arithmetic on the last axis (coefficients in increasing degree) ------------------


def _polymul(a, b, n: int | None = None):
    """Product of polynomials a and b (broadcast over leading axes), first n coefficients."""
    full = a.shape[-1] + b.shape[-1] - 1
    n = full if n is None else n
    size = 1 << max(full - 1, 1).bit_length()
    out = jnp.fft.irfft(jnp.fft.rfft(a, size) * jnp.fft.rfft(b, size), size)[..., :min(n, full)]
    return _fit(out, n)


def _fit(a, n: int):
    """Truncate or zero-pad the last axis to n coefficients."""
    m = a.shape[-1]
    if m >= n:
        return a[..., :n]
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n - m)])


def _add(*polys):
    n = max(p.shape[-1] for p in polys)
    return sum(_fit(p, n) for p in polys)


def _shift(a, k: int = 1):
    """z^k a(z)."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(k, 0)])


def _series_inverse(f, n: int):
    """g with f g = 1 mod z^n (f[..., 0] != 0), by Newton's iteration g <- g (2 - f g) mod z^2m.

    Every iteration works at the full length n with a mask for mod z^2m: one FFT size, one loop
    body (O(n log^2 n) instead of O(n log n), far less to compile and to differentiate)."""
    f = _fit(f, n)
    g = jnp.zeros_like(f).at[..., 0].set(1.0 / f[..., 0])
    idx = jnp.arange(n)
    two = jnp.zeros((n,), _F32).at[0].set(2.0)

    def newton(i, g):
        keep = idx < jnp.left_shift(2, i)  # mod z^(2^(i+1))
        e = jnp.where(keep, _polymul(f, g, n), 0.0)
        return jnp.where(keep, _polymul(g, two - e, n), 0.0)

    return jax.lax.fori_loop(0, max(n - 1, 1).bit_length(), newton, g)


def _krylov_poly(x, y):
    """x^T M^{-1} y = sum_j z^j x^T S^j y, i.e. coefficient j = sum_m x_{m+j} y_m (degree < d)."""
    d = x.shape[-1]
    return _polymul(x[..., ::-1], y, d)[..., ::-1]


@functools.partial(jax.jit, static_argnames="length")
def companion_kernel(p, b, c, length: int, *, k=None, x=None) -> jax.Array:
    """K_j = c^T (A + b k^T)^j x for j < length, with A = S + p e_d^T; k=None: no feedback;
    x=None: x = b. p, b, c, k, x: [..., d] (broadcast). Returns [..., length], float32.

    O((d + length) log(d + length)) per row: FFT correlations and one series inversion."""
    p, b, c = (jnp.asarray(a, _F32) for a in (p, b, c))
    v = b if x is None else jnp.asarray(x, _F32)
    e = jnp.zeros(p.shape[-1], _F32).at[-1].set(1.0)
    U = [p] if k is None else [p, b]
    V = [e] if k is None else [e, jnp.asarray(k, _F32)]
    r = len(U)
    # Every x^T M^{-1} y the formula needs, in one batched FFT correlation.
    pairs = [(c, v)] + [(c, u) for u in U] + [(w, v) for w in V] + [(w, u) for w in V for u in U]
    lhs = jnp.broadcast_arrays(*[a for a, _ in pairs], *[b_ for _, b_ in pairs])
    n_p = len(pairs)
    P = _krylov_poly(jnp.stack(lhs[:n_p], -2), jnp.stack(lhs[n_p:], -2))  # [..., n_p, d]
    cv, cU, Vv = P[..., 0, :], P[..., 1:1 + r, :], P[..., 1 + r:1 + 2 * r, :]
    W = P[..., 1 + 2 * r:, :]  # W[j * r + i] = V_j^T M^{-1} U_i
    # X = I - z W (r x r); K(z) = c M^{-1} v + z (c M^{-1} U) adj(X) (V^T M^{-1} v) / det X.
    eye = jnp.eye(r, dtype=_F32).reshape(r * r, 1)
    X = _add(jnp.broadcast_to(eye, W.shape[:-1] + (1,)), -_shift(W))  # [..., r*r, d+1]
    if r == 1:
        det = X[..., 0, :]
        quad = _polymul(cU[..., 0, :], Vv[..., 0, :])
    else:
        # det = X00 X11 - X01 X10; adj rows U, cols V: [[X11, -X01], [-X10, X00]].
        prods = _polymul(X[..., jnp.array([0, 1]), :], X[..., jnp.array([3, 2]), :])
        det = prods[..., 0, :] - prods[..., 1, :]
        adj = X[..., jnp.array([3, 1, 2, 0]), :] * jnp.array([1.0, -1.0, -1.0, 1.0], _F32)[:, None]
        cU_Vv = _polymul(cU[..., jnp.array([0, 0, 1, 1]), :], Vv[..., jnp.array([0, 1, 0, 1]), :])
        quad = jnp.sum(_polymul(cU_Vv, adj), axis=-2)
    num = _add(_polymul(cv, det), _shift(quad))
    return _polymul(_fit(num, length), _series_inverse(det, length), length)


@jax.jit
def companion_state(p, b, u, *, x0=None) -> jax.Array:
    """State after x_t = A x_{t-1} + b u_t for t < L from x_{-1} = x0 (default 0).

    x_{L-1} = A^L x0 + sum_i A^{L-1-i} b u_i, whose coordinates are the coefficients of
    (z^L x0(z) + U(z) b(z)) mod chi(z), U(z) = sum_i u_i z^{L-1-i}, chi(z) = z^d - sum_i p_i z^i
    (the Krylov basis of e_0). p, b: [..., d]; u: [..., L]. Returns [..., d]."""
    p, b, u = (jnp.asarray(a, _F32) for a in (p, b, u))
    L = u.shape[-1]
    f = _polymul(u[..., ::-1], b)
    if x0 is not None:
        f = _add(f, _shift(jnp.asarray(x0, _F32), L))
    return _poly_mod(f, p)


def _poly_mod(f, p):
    """f mod chi for chi(z) = z^d - sum_i p_i z^i (monic), via the reversed series inverse."""
    d, m = p.shape[-1], f.shape[-1]
    if m <= d:
        return _fit(f, d)
    q_len = m - d
    rev_chi = jnp.concatenate([jnp.ones(p.shape[:-1] + (1,), _F32), -p[..., ::-1]], axis=-1)
    rev_q = _polymul(f[..., ::-1], _series_inverse(rev_chi, q_len), q_len)
    chi = jnp.concatenate([-p, jnp.ones(p.shape[:-1] + (1,), _F32)], axis=-1)
    return f[..., :d] - _polymul(rev_q[..., ::-1], chi, d)


def causal_fft_conv(u_BLM, K_ML) -> jax.Array:
    """y_t = sum_{i <= t} K_{t-i} u_i along the time axis, per channel m (FFT, O(L log L))."""
    L = u_BLM.shape[1]
    u_BML = jnp.swapaxes(u_BLM.astype(_F32), 1, 2)
    return jnp.swapaxes(_polymul(u_BML, K_ML, L), 1, 2)


@functools.partial(jax.jit, static_argnames="horizon")
def closed_loop(p, b, c, k, u_BML, horizon: int) -> tuple[jax.Array, jax.Array]:
    """One closed-loop companion SSM per channel over inputs u [B, M, L].

    Open loop over the window (x_t = A x_{t-1} + b u_t) with next-input predictions
    u_hat_{t+1} = k^T x_t; then `horizon` closed-loop steps x <- (A + b k^T) x, y = c^T x.
    p, b, c, k: [M, d]. Returns (y [B, M, horizon], u_hat [B, M, L]: u_hat[..., t] predicts
    u[..., t+1], the last one predicts the first closed-loop input)."""
    L = u_BML.shape[-1]
    u_hat = _polymul(u_BML.astype(_F32), companion_kernel(p, b, k, L), L)
    x_BMD = companion_state(p, b, u_BML)
    y = companion_kernel(p, b, c, horizon + 1, k=k, x=x_BMD)[..., 1:]
    return y, u_hat


def stable_column(a_MD, bound: float = 1.0) -> jax.Array:
    """p = bound * a / max(bound, ||a||_1), so ||p||_1 <= bound <= 1 and every root z of
    z^d = sum_i p_i z^i has |z| <= bound^(1/d): a root with |z| >= 1 needs |z|^d <= ||p||_1 |z|^(d-1),
    i.e. |z| <= ||p||_1; one with |z| < 1 needs |z|^d <= ||p||_1. bound = 1 is the closed unit disk,
    the paper's l1-normalised companion column (Zhang et al. 2023, sec. 3.1; official code
    `norm_a_order=1`); bound < 1 is strictly stable. a: [..., d]."""
    l1 = jnp.sum(jnp.abs(a_MD), axis=-1, keepdims=True)
    return a_MD * (bound / jnp.maximum(bound, l1))


def closed_loop_feedback(p_MD, q_MD) -> tuple[jax.Array, jax.Array]:
    """(b, k) with A + b k^T = S + q e_d^T for A = S + p e_d^T: b = q - p, k = e_d.

    Why this loses nothing: the closed-loop poles are the roots of chi(z) - n_k(z), where n_k / chi =
    k^T (zI - A)^{-1} b is the next-input predictor (matrix determinant lemma), so picking the
    closed-loop polynomial is picking the predictor; and any (A, b, c, k) whose predictor has no pole-zero
    cancellation is similar (same forecasts) to one with the same A whose predictor reads the last state
    coordinate, since (A, e_d^T) is observable. With q = stable_column(., bound<1)
    the closed-loop spectral radius is <= bound^(1/d) < 1 by construction. p, q: [..., d]."""
    k = jnp.zeros(q_MD.shape, _F32).at[..., -1].set(1.0)
    return q_MD - p_MD, k


# --- the forecasting model -----------------------------------------------------------------------


INPUT_TRANSFORMS = ("mean", "last", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpaceTimeConfig:
    """A small SpaceTime forecaster: open-loop encoder layers, one closed-loop decoder layer."""

    n_features: int = 1  # channels of the time series
    d_model: int = 32  # embedding width; each channel has its own companion SSM
    state_size: int = 32  # d
    n_layers: int = 2  # open-loop encoder layers
    mlp_ratio: int = 2
    horizon: int = 96  # the longest forecast this model makes (and is trained for)
    next_step_weight: float = 1.0  # weight of the open-loop next-step loss
    closed_loop_l1: float = 0.999  # ||q||_1 bound: closed-loop spectral radius <= closed_loop_l1^(1/d) < 1
    input_transform: str = "mean"  # level removed from each lag window and added back: mean | last | none
    init_std: float = 0.02
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("n_features", "d_model", "state_size", "n_layers", "mlp_ratio", "horizon"):
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"spacetime.{name}: {v} must be >= 1")
        if self.next_step_weight < 0:
            raise ConfigError(f"spacetime.next_step_weight: {self.next_step_weight} must be >= 0")
        if not 0.0 < self.closed_loop_l1 < 1.0:
            raise ConfigError(f"spacetime.closed_loop_l1: {self.closed_loop_l1} must be in (0, 1) so the "
                              "closed loop is stable (spectral radius <= closed_loop_l1^(1/state_size))")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ConfigError(f"spacetime.input_transform: {self.input_transform!r} is not one of "
                              f"{', '.join(INPUT_TRANSFORMS)}")


def window_offset(x_BLF, transform: str) -> jax.Array:
    """The per-window level [B, 1, F] subtracted from the lag window and added back to the forecast:
    the lag mean ("mean", the official code's default `data_transform`), the last value ("last") or
    zero ("none"). Removing it makes the forecast equivariant to a level shift of the window, so a
    trend that leaves the train range does not leave the model's input range."""
    x_BLF = x_BLF.astype(_F32)
    if transform == "mean":
        return jnp.mean(x_BLF, axis=1, keepdims=True)
    if transform == "last":
        return x_BLF[:, -1:]
    if transform == "none":
        return jnp.zeros_like(x_BLF[:, :1])
    raise ConfigError(f"spacetime.input_transform: {transform!r} is not one of {', '.join(INPUT_TRANSFORMS)}")


def _rms(x, scale, eps):
    x = x.astype(_F32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


class _CompanionParams(nnx.Module):
    """Open-loop companion SSM per channel: A = S + p e_d^T, b, c."""

    def __init__(self, M: int, d: int, rngs: nnx.Rngs):
        self.a = param(rngs, normal(0.5 / math.sqrt(d)), (M, d), (None, None))
        self.b = param(rngs, normal(1.0 / math.sqrt(d)), (M, d), (None, None))
        self.c = param(rngs, normal(1.0 / math.sqrt(d)), (M, d), (None, None))

    def p(self):
        return stable_column(self.a[...])


class _ClosedLoopParams(nnx.Module):
    """Closed-loop companion SSM per channel, parameterised by its open-loop column p (from a), its
    closed-loop column q (from a_cl, ||q||_1 <= l1_bound < 1) and c; b and k follow
    (`closed_loop_feedback`)."""

    def __init__(self, M: int, d: int, rngs: nnx.Rngs, *, l1_bound: float):
        self.a = param(rngs, normal(0.5 / math.sqrt(d)), (M, d), (None, None))
        self.a_cl = param(rngs, normal(0.5 / math.sqrt(d)), (M, d), (None, None))
        self.c = param(rngs, normal(1.0 / math.sqrt(d)), (M, d), (None, None))
        self.l1_bound = l1_bound

    def system(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(p, b, c, k), each [M, d], with spectral radius of A + b k^T <= l1_bound^(1/d) < 1."""
        p = stable_column(self.a[...])
        b, k = closed_loop_feedback(p, stable_column(self.a_cl[...], self.l1_bound))
        return p, b, self.c[...], k


class _EncoderLayer(nnx.Module):
    """Pre-norm open-loop companion SSM (one per channel, skip D) and a GELU MLP, both residual."""

    def __init__(self, cfg: SpaceTimeConfig, rngs: nnx.Rngs):
        M, F = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.ssm = _CompanionParams(M, cfg.state_size, rngs)
        self.D = param(rngs, constant(1.0), (M,), (None,))
        self.norm1 = param(rngs, constant(1.0), (M,), ("norm",))
        self.norm2 = param(rngs, constant(1.0), (M,), ("norm",))
        self.w1 = param(rngs, normal(cfg.init_std), (M, F), ("embed", "mlp"))
        self.w2 = param(rngs, normal(cfg.init_std), (F, M), ("mlp", "embed"))
        self.eps = cfg.norm_eps

    def __call__(self, z_BLM):
        L = z_BLM.shape[1]
        u = _rms(z_BLM, self.norm1[...], self.eps)
        K_ML = companion_kernel(self.ssm.p(), self.ssm.b[...], self.ssm.c[...], L)
        h = z_BLM + causal_fft_conv(u, K_ML) + self.D[...] * u
        m = jax.nn.gelu(_rms(h, self.norm2[...], self.eps) @ self.w1[...]) @ self.w2[...]
        return h + m


class SpaceTime(nnx.Module):
    """Forecaster: embed -> open-loop encoder layers -> closed-loop companion decoder -> head.

    The window's level (cfg.input_transform) is subtracted first and added back to the forecast.
    The decoder reads the lag window open-loop, predicting each next input from its state
    (u_{t+1} ~ k^T x_t, the open-loop next-step loss), then forecasts closed-loop: from the last
    state it evolves with A + b k^T (predicted inputs fed back; a companion matrix with spectral
    radius < 1 by construction) and reads y = c^T x for each horizon step (the closed-loop horizon
    loss)."""

    def __init__(self, cfg: SpaceTimeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        M = cfg.d_model
        self.w_in = param(rngs, normal(1.0 / math.sqrt(cfg.n_features)), (cfg.n_features, M), (None, "embed"))
        self.b_in = param(rngs, constant(0.0), (M,), ("embed",))
        self.layers = nnx.List([_EncoderLayer(cfg, rngs) for _ in range(cfg.n_layers)])
        self.decoder = _ClosedLoopParams(M, cfg.state_size, rngs, l1_bound=cfg.closed_loop_l1)
        self.norm = param(rngs, constant(1.0), (M,), ("norm",))
        self.w_out = param(rngs, normal(1.0 / math.sqrt(M)), (M, cfg.n_features), ("embed", None))

    def _check(self, x_BLF, horizon):
        cfg = self.cfg
        if x_BLF.ndim != 3 or x_BLF.shape[-1] != cfg.n_features or x_BLF.shape[1] < 2:
            raise ShapeError(f"SpaceTime: input shape {tuple(x_BLF.shape)} must be [batch, lag >= 2, "
                             f"n_features={cfg.n_features}]")
        horizon = cfg.horizon if horizon is None else horizon
        if not 1 <= horizon <= cfg.horizon:
            raise ConfigError(f"spacetime.horizon: a forecast of {horizon} steps exceeds the configured "
                              f"horizon {cfg.horizon} (the longest the model makes); raise "
                              "SpaceTimeConfig.horizon or ask for fewer steps")
        return horizon

    def __call__(self, x_BLF, *, horizon: int | None = None):
        """Returns (forecast [B, h, F], next-step predictions [B, L-1, M], their targets [B, L-1, M])."""
        h = self._check(x_BLF, horizon)
        offset_B1F = window_offset(x_BLF, self.cfg.input_transform)
        z = (x_BLF.astype(_F32) - offset_B1F) @ self.w_in[...] + self.b_in[...]
        for layer in self.layers:
            z = layer(z)
        u_BLM = _rms(z, self.norm[...], self.cfg.norm_eps)
        y_BMH, u_hat_BML = closed_loop(*self.decoder.system(), jnp.swapaxes(u_BLM, 1, 2), h)
        forecast = jnp.swapaxes(y_BMH, 1, 2) @ self.w_out[...] + offset_B1F
        return forecast, jnp.swapaxes(u_hat_BML, 1, 2)[:, :-1], u_BLM[:, 1:]

    def forecast(self, x_BLF, *, horizon: int | None = None) -> jax.Array:
        """The next `horizon` (default cfg.horizon) values [B, h, F] after the lag window x [B, L, F]."""
        return self(x_BLF, horizon=horizon)[0]

    def loss(self, x_BLF, y_BHF) -> tuple[jax.Array, dict]:
        """Closed-loop horizon MSE + next_step_weight * open-loop next-step MSE."""
        if y_BHF.ndim != 3 or y_BHF.shape[0] != x_BLF.shape[0] or y_BHF.shape[-1] != self.cfg.n_features:
            raise ShapeError(f"SpaceTime.loss: target shape {tuple(y_BHF.shape)} must be [batch, horizon, "
                             f"n_features] matching input {tuple(x_BLF.shape)}")
        forecast, next_pred, next_true = self(x_BLF, horizon=y_BHF.shape[1])
        horizon_mse = jnp.mean((forecast - y_BHF.astype(_F32)) ** 2)
        next_mse = jnp.mean((next_pred - next_true) ** 2)
        total = horizon_mse + self.cfg.next_step_weight * next_mse
        return total, {"horizon_mse": horizon_mse, "next_step_mse": next_mse}
