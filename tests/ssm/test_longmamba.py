"""horizon.ssm.longmamba: identity at the training length, the threshold's closed form, filtering
only global heads, calibration of a model with several mixers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import SSM, Model
from horizon.errors import ConfigError
from horizon.ssm import longmamba
from horizon.ssm.ssd import Mamba2

_CFG = Model(d_model=16, n_heads=2, n_layers=2, ssm=SSM(state_size=8, head_dim=8, chunk=8))


class _Stack(nnx.Module):
    """Two residual Mamba2 mixers: enough structure to check per-layer calibration."""

    def __init__(self, rngs):
        self.layers = nnx.List([Mamba2(_CFG, layer_index=i, rngs=rngs) for i in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform_layer(train_len=100, Q=256, is_global=(True, False)):
    # dt ~ U(0, 1) in both heads: quantiles (i + 1/2)/Q, mean cumulative sum train_len / 2.
    q = tuple((np.arange(Q) + 0.5) / Q)
    return longmamba.LongMambaLayer(train_len=train_len, dt_sum=(train_len / 2,) * 2,
                                    is_global=is_global, dt_quantiles=(q, q))


def test_filter_is_identity_at_the_training_length():
    mixer = Mamba2(_CFG, layer_index=0, rngs=nnx.Rngs(0))
    x = _x((2, 32, 16))
    stats = longmamba.calibrate(mixer, x)
    assert len(stats) == 1 and stats[()].train_len == 32
    # Every head global, so an identity can only come from the length rule.
    forced = dataclasses.replace(stats[()], is_global=(True,) * stats[()].n_heads)
    call = nnx.jit(lambda m, x, lm: m(x, longmamba=lm), static_argnums=2)
    y_plain = call(mixer, x, None)
    np.testing.assert_array_equal(np.asarray(call(mixer, x, forced)), np.asarray(y_plain))
    # The same input is longer than a calibration at half the length: the global heads filter.
    shorter = dataclasses.replace(forced, train_len=16)
    assert not np.allclose(np.asarray(call(mixer, x, shorter)), np.asarray(y_plain), atol=1e-6)


def test_threshold_matches_closed_form_for_uniform_dt():
    # E[dt 1(dt >= tau)] = (1 - tau^2) / 2 for U(0, 1); keeping the training-length sum S = T/2 over
    # L = 2T tokens needs (1 - tau^2)/2 = 1/4, tau = 1/sqrt(2); over L = 4T, tau = sqrt(3)/2.
    layer = _uniform_layer()
    np.testing.assert_allclose(np.asarray(longmamba.threshold(layer, 200)), 2 ** -0.5, atol=4 / 256)
    np.testing.assert_allclose(np.asarray(longmamba.threshold(layer, 400)), 3 ** 0.5 / 2, atol=4 / 256)


def test_filter_zeroes_only_small_dt_in_global_heads():
    layer = _uniform_layer()
    dt = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 400, 2)), jnp.float32)
    tau = float(longmamba.threshold(layer, 400)[0])
    # At or below the training length nothing changes, whatever the values.
    np.testing.assert_array_equal(np.asarray(longmamba.filter_dt(dt[:, :100], layer)), dt[:, :100])
    np.testing.assert_array_equal(np.asarray(longmamba.filter_dt(dt, layer, length=100)), dt)
    out = np.asarray(longmamba.filter_dt(dt, layer))
    dt = np.asarray(dt)
    np.testing.assert_array_equal(out[..., 1], dt[..., 1])  # local head untouched
    np.testing.assert_array_equal(out[..., 0], np.where(dt[..., 0] < tau, 0.0, dt[..., 0]))
    # The retained cumulative step size is back near the training-length sum (T/2 = 50).
    np.testing.assert_allclose(out[..., 0].sum(axis=1), 50.0, rtol=0.2)


def test_calibration_marks_global_heads_by_cumulative_decay():
    model = _Stack(nnx.Rngs(1))
    x = _x((2, 32, 16), 2)
    stats = longmamba.calibrate(model, x, global_decay=0.3)
    assert [p for p, _ in stats.layers] == [("layers", 0), ("layers", 1)]
    mixer = model.layers[0]
    # Independent recomputation of the first mixer's dt from its parameters.
    dt = jax.nn.softplus(x @ mixer.w_dt[...] + mixer.dt_bias[...])
    dt_sum = np.asarray(dt.sum(axis=1).mean(axis=0))
    layer0 = stats[("layers", 0)]
    np.testing.assert_allclose(layer0.dt_sum, dt_sum, rtol=1e-5)
    expected = np.exp(np.asarray(mixer.A_H()) * dt_sum) >= 0.3
    assert layer0.is_global == tuple(bool(v) for v in expected)
    assert not mixer.collect_dt  # calibration leaves the mixers as they were
    longmamba.enable(model, stats)
    assert model.layers[1].longmamba == stats[("layers", 1)]
    longmamba.disable(model)
    assert model.layers[1].longmamba is None


def test_bad_calibration_requests_raise_config_error():
    with pytest.raises(ConfigError, match="global_decay"):
        longmamba.calibrate(_Stack(nnx.Rngs(0)), jnp.zeros((1, 8, 16)), global_decay=1.5)
    with pytest.raises(ConfigError, match="no Mamba2 mixer"):
        longmamba.calibrate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.zeros((1, 2)))
