"""LongMamba: training-free receptive-field enlargement of Mamba-2 mixers (Ye et al., ICLR 2025).

Calibrate once at the training length: per head (a Mamba-2 "channel"), the mean cumulative step
size S = E[sum_t dt_t] and the distribution of dt. Heads whose cumulative decay exp(A S) over the
training length stays above `global_decay` see the whole context ("global" heads). On an input of
length L > training length, a global head keeps only the tokens whose dt reaches a length-dependent
threshold tau(L), chosen so that the expected retained sum L * E[dt 1(dt >= tau)] equals S: the
head's memory then decays over L tokens as it did over the training length. The other tokens get
dt = 0 (no decay, no input). Local heads and inputs up to the training length are untouched.

API (pure apart from setting a static attribute):
  stats = calibrate(model, batch)            # LongMambaStats, one LongMambaLayer per Mamba2 mixer
  enable(model, stats) / disable(model)      # sets mixer.longmamba, read by Mamba2 calls and steps
  mixer(x, ..., longmamba=layer_stats)       # or pass one layer's stats explicitly
  filter_dt(dt_BTH, layer_stats, length=L)   # the filter itself
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.errors import ConfigError, ShapeError

# Name of the nnx.Intermediate a Mamba2 mixer sows its dt into while calibrating.
SOW_NAME = "longmamba_dt"


@dataclasses.dataclass(frozen=True)
class LongMambaLayer:
    """Calibration of one mixer (static, hashable: it may live on a module as plain data).

    train_len: calibration (training) length. dt_sum[h]: mean of sum_t dt over that length.
    is_global[h]: exp(A_h dt_sum[h]) >= global_decay. dt_quantiles[h]: ascending dt quantiles at
    levels (i + 1/2) / Q."""

    train_len: int
    dt_sum: tuple[float, ...]
    is_global: tuple[bool, ...]
    dt_quantiles: tuple[tuple[float, ...], ...]

    @property
    def n_heads(self) -> int:
        return len(self.dt_sum)


@dataclasses.dataclass(frozen=True)
class LongMambaStats:
    """Per-mixer calibrations keyed by the mixer's module path in the model."""

    layers: tuple[tuple[tuple[Any, ...], LongMambaLayer], ...]

    def __getitem__(self, path) -> LongMambaLayer:
        table = dict(self.layers)
        if tuple(path) not in table:
            raise ConfigError(f"longmamba: no calibration for the mixer at {tuple(path)} (have "
                              f"{[p for p, _ in self.layers]}); calibrate this model")
        return table[tuple(path)]

    def __len__(self) -> int:
        return len(self.layers)


def threshold(layer: LongMambaLayer, length) -> jax.Array:
    """tau_h(L) [H]: the smallest calibrated dt quantile q_k with L * E[dt 1(dt >= q_k)] <= S_h.

    The tail mean E[dt 1(dt >= q_k)] is estimated from the quantile table as sum_{i>=k} q_i / Q."""
    q_HQ = jnp.asarray(layer.dt_quantiles, jnp.float32)
    Q = q_HQ.shape[1]
    tail_HQ = jnp.cumsum(q_HQ[:, ::-1], axis=1)[:, ::-1] / Q
    target_H = jnp.asarray(layer.dt_sum, jnp.float32) / jnp.asarray(length, jnp.float32)
    k_H = jnp.minimum(jnp.sum(tail_HQ > target_H[:, None], axis=1), Q - 1)
    return jnp.take_along_axis(q_HQ, k_H[:, None], axis=1)[:, 0]


def filter_dt(dt_BTH: jax.Array, layer: LongMambaLayer, *, length=None) -> jax.Array:
    """Zero dt below tau(length) in global heads when length exceeds the training length.

    length: the sequence length the threshold is for (default T = dt.shape[1]); may be traced
    (decoding passes the running length). At length <= train_len this is the identity."""
    H = dt_BTH.shape[-1]
    if layer.n_heads != H:
        raise ShapeError(f"longmamba: stats have {layer.n_heads} heads but dt has {H}; calibrate this "
                         "model (its mixers) again")
    length = dt_BTH.shape[1] if length is None else length
    if isinstance(length, int) and length <= layer.train_len:
        return dt_BTH
    is_global_H = jnp.asarray(layer.is_global)
    drop_BTH = is_global_H & (dt_BTH < threshold(layer, length).astype(dt_BTH.dtype))
    drop_BTH = drop_BTH & (jnp.asarray(length) > layer.train_len)
    return jnp.where(drop_BTH, jnp.zeros_like(dt_BTH), dt_BTH)


def layer_stats(dt_BTH: jax.Array, A_H: jax.Array, *, n_quantiles: int = 64,
                global_decay: float = 0.05) -> LongMambaLayer:
    """Calibration of one mixer from its dt on a batch at the training length (T = dt.shape[1])."""
    dt = np.asarray(dt_BTH, np.float64)
    A = np.asarray(A_H, np.float64)
    dt_sum = dt.sum(axis=1).mean(axis=0)  # [H]
    levels = (np.arange(n_quantiles) + 0.5) / n_quantiles
    q = np.quantile(dt.reshape(-1, dt.shape[-1]), levels, axis=0).T  # [H, Q]
    is_global = np.exp(A * dt_sum) >= global_decay
    return LongMambaLayer(
        train_len=int(dt.shape[1]),
        dt_sum=tuple(float(v) for v in dt_sum),
        is_global=tuple(bool(v) for v in is_global),
        dt_quantiles=tuple(tuple(float(v) for v in row) for row in q),
    )


def _mixers(model: nnx.Module):
    from horizon.ssm.ssd import Mamba2  # the mixer module imports this file

    return [(tuple(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Mamba2)]


def calibrate(model: nnx.Module, batch, *, apply: Callable | None = None, n_quantiles: int = 64,
              global_decay: float = 0.05) -> LongMambaStats:
    """Run `apply(model, batch)` (default: `model(batch)` under nnx.jit) once at the training
    length and calibrate every Mamba2 mixer in `model` (the model itself may be one mixer).
    Call calibrate itself outside jit: it returns static, hashable stats."""
    if not 0.0 < global_decay < 1.0:
        raise ConfigError(f"longmamba.global_decay: {global_decay} must be in (0, 1)")
    mixers = _mixers(model)
    if not mixers:
        raise ConfigError("longmamba.calibrate: the model has no Mamba2 mixer to calibrate")
    apply = nnx.jit(lambda m, b: m(b)) if apply is None else apply
    for _, m in mixers:
        m.collect_dt = True
    try:
        _, intermediates = nnx.capture(apply, nnx.Intermediate)(model, batch)
    finally:
        for _, m in mixers:
            m.collect_dt = False
    sown = {tuple(path[:-1]): var for path, var in nnx.to_flat_state(intermediates) if path[-1] == SOW_NAME}
    layers = []
    for path, m in mixers:
        if path not in sown:
            raise ConfigError(f"longmamba.calibrate: mixer at {path} did not run under apply(model, batch)")
        value = sown[path].get_value()
        dt_BTH = jnp.concatenate(list(value), axis=0) if isinstance(value, tuple) else value
        layers.append((path, layer_stats(dt_BTH, m.A_H(), n_quantiles=n_quantiles,
                                         global_decay=global_decay)))
    return LongMambaStats(layers=tuple(layers))


def enable(model: nnx.Module, stats: LongMambaStats) -> nnx.Module:
    """Attach each mixer's calibration (mixer.longmamba); later calls and steps filter dt."""
    for path, m in _mixers(model):
        m.longmamba = stats[path]
    return model


def disable(model: nnx.Module) -> nnx.Module:
    for _, m in _mixers(model):
        m.longmamba = None
    return model
