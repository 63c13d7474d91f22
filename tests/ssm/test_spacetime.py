"""horizon.ssm.spacetime: the fast companion kernel against naive matrix powers, the state by
polynomial reduction against the recurrence, closed-loop forecasting against a step-by-step
simulation, the closed-loop spectral radius against numpy eigenvalues, the window level transform,
the forecaster's losses, and the horizon limit."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from horizon.errors import ConfigError, ShapeError
from horizon.ssm.spacetime import (
    SpaceTime,
    SpaceTimeConfig,
    closed_loop,
    closed_loop_feedback,
    companion_kernel,
    companion_state,
    stable_column,
    window_offset,
)


def _companion(p):
    d = len(p)
    A = np.zeros((d, d))
    A[1:, :-1] = np.eye(d - 1)  # shift: A e_j = e_{j+1}
    A[:, -1] = p
    return A


def _powers(A, v, c, n):
    """c^T A^j v for j < n by repeated products, in float64."""
    out = []
    for _ in range(n):
        out.append(c @ v)
        v = A @ v
    return np.array(out)


def _system(seed, d, feedback_scale=0.05):
    rng = np.random.default_rng(seed)
    p = np.asarray(stable_column(jnp.asarray(rng.standard_normal(d))), np.float64) * 0.95
    b, c, k, x = (rng.standard_normal(d) for _ in range(4))
    return p, b, c, k * feedback_scale, x


@pytest.mark.parametrize("d,length", [(1, 5), (7, 3), (8, 64), (16, 300)])
def test_fast_kernel_equals_naive_powers(d, length):
    p, b, c, k, x = _system(d + length, d)
    A = _companion(p)
    want = _powers(A, b, c, length)
    got = np.asarray(companion_kernel(p, b, c, length))
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, np.abs(want).max()), rtol=0)
    # With feedback (A + b k^T, rank-2 Woodbury) and a different start vector.
    want_fb = _powers(A + np.outer(b, k), x, c, length)
    got_fb = np.asarray(companion_kernel(p, b, c, length, k=k, x=x))
    np.testing.assert_allclose(got_fb, want_fb, atol=2e-5 * max(1.0, np.abs(want_fb).max()), rtol=0)


def test_fast_kernel_batches_over_channels():
    systems = [_system(s, 6) for s in range(3)]
    p, b, c = (np.stack([s[i] for s in systems]) for i in range(3))
    got = np.asarray(companion_kernel(p, b, c, 20))
    for m, (pm, bm, cm, _, _) in enumerate(systems):
        np.testing.assert_allclose(got[m], _powers(_companion(pm), bm, cm, 20), atol=5e-5)


@pytest.mark.parametrize("d,L", [(6, 4), (6, 50)])
def test_companion_state_equals_recurrence(d, L):
    p, b, _, _, x0 = _system(L, d)
    u = np.random.default_rng(1).standard_normal(L)
    A, x = _companion(p), x0.copy()
    for t in range(L):
        x = A @ x + b * u[t]
    got = np.asarray(companion_state(p, b, u, x0=x0))
    np.testing.assert_allclose(got, x, atol=2e-5 * max(1.0, np.abs(x).max()))


def test_closed_loop_forecast_equals_step_by_step_simulation():
    d, L, H = 5, 12, 30
    p, b, c, k, _ = _system(3, d, feedback_scale=0.3)
    u = np.random.default_rng(4).standard_normal(L)
    A = _companion(p)
    x, u_hat = np.zeros(d), []
    for t in range(L):  # open loop over the window, predicting each next input
        x = A @ x + b * u[t]
        u_hat.append(k @ x)
    ys = []
    for _ in range(H):  # closed loop: the predicted input is fed back
        x = A @ x + b * (k @ x)
        ys.append(c @ x)
    y, u_pred = closed_loop(p[None], b[None], c[None], k[None], jnp.asarray(u)[None, None], H)
    np.testing.assert_allclose(np.asarray(y[0, 0]), ys, atol=1e-4 * max(1.0, np.abs(ys).max()))
    np.testing.assert_allclose(np.asarray(u_pred[0, 0]), u_hat, atol=1e-5)


@pytest.mark.parametrize("d", [1, 2, 8, 32])
def test_closed_loop_matrix_spectral_radius_below_one_by_construction(d):
    # Raw parameters from tiny to huge norms, as an optimiser could reach.
    rng = np.random.default_rng(d)
    a, a_cl = (rng.standard_normal((64, d)) * np.logspace(-2, 3, 64)[:, None] for _ in range(2))
    bound = 0.9
    p = stable_column(jnp.asarray(a))
    q = stable_column(jnp.asarray(a_cl), bound)
    b, k = closed_loop_feedback(p, q)
    p, q, b, k = (np.asarray(v, np.float64) for v in (p, q, b, k))
    for m in range(len(a)):
        A_cl = _companion(p[m]) + np.outer(b[m], k[m])
        rho = np.abs(np.linalg.eigvals(A_cl)).max()
        # The rollout matrix is the companion matrix of q, so its roots obey the l1 bound.
        np.testing.assert_allclose(A_cl, _companion(q[m]), atol=1e-6)
        assert rho <= bound ** (1 / d) + 1e-6 < 1, (m, rho)
        assert np.abs(np.linalg.eigvals(_companion(p[m]))).max() <= 1 + 1e-6
        # Max column sum 1: a rollout never grows in the l1 norm.
        assert np.abs(A_cl).sum(0).max() <= 1 + 1e-6


def test_closed_loop_of_model_parameters_equals_step_by_step_simulation():
    # The model's decoder (p, b, c, k) from raw parameters, rolled out in plain numpy (shapes as in
    # the test above, so the jitted closed_loop is reused).
    d, L, H = 5, 12, 30
    cfg = SpaceTimeConfig(n_features=1, d_model=1, state_size=d, n_layers=1, horizon=H, closed_loop_l1=0.95)
    p, b, c, k = (np.asarray(v, np.float64)[0] for v in SpaceTime(cfg, rngs=nnx.Rngs(1)).decoder.system())
    u = np.random.default_rng(2).standard_normal(L)
    y, _ = closed_loop(p[None], b[None], c[None], k[None], jnp.asarray(u)[None, None], H)
    A, x = _companion(p), np.zeros(d)
    for t in range(L):
        x = A @ x + b * u[t]
    ys = []
    for _ in range(H):
        x = A @ x + b * (k @ x)
        ys.append(c @ x)
    np.testing.assert_allclose(np.asarray(y[0, 0]), ys, atol=1e-5 * max(1.0, np.abs(ys).max()))


def test_window_offset_is_the_lag_mean_or_last_value_and_forecast_shifts_with_it():
    x = np.random.default_rng(0).standard_normal((2, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(window_offset(jnp.asarray(x), "mean"), x.mean(1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(window_offset(jnp.asarray(x), "last"), x[:, 6:7], atol=0)
    np.testing.assert_allclose(window_offset(jnp.asarray(x), "none"), np.zeros((2, 1, 3)), atol=0)
    # A level shift of the window shifts the forecast by the same amount (the transform's purpose).
    cfg = SpaceTimeConfig(n_features=3, d_model=4, state_size=4, n_layers=1, horizon=5)
    forecast = nnx.jit(lambda model, x: model.forecast(x))
    model = SpaceTime(cfg, rngs=nnx.Rngs(0))
    shift = np.array([3.0, -1.0, 0.5], np.float32)
    np.testing.assert_allclose(forecast(model, jnp.asarray(x + shift)), forecast(model, jnp.asarray(x)) + shift,
                               atol=1e-4)


_CFG = SpaceTimeConfig(n_features=2, d_model=8, state_size=8, n_layers=1, horizon=16)


def test_forecaster_learns_a_sine_with_horizon_plus_next_step_loss():
    t = np.arange(64 + 16)
    series = np.stack([np.sin(2 * np.pi * t / 16), np.cos(2 * np.pi * t / 10)], -1).astype(np.float32)
    x, y = jnp.asarray(series[None, :64]), jnp.asarray(series[None, 64:])
    model = SpaceTime(_CFG, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        (loss, parts), grads = nnx.value_and_grad(lambda m: m.loss(x, y), has_aux=True)(model)
        opt.update(model, grads)
        return loss, parts

    first, parts = train_step(model, opt)
    assert float(parts["next_step_mse"]) > 0 and float(parts["horizon_mse"]) > 0
    for _ in range(40):
        loss, _ = train_step(model, opt)
    assert float(loss) < 0.5 * float(first), (float(first), float(loss))


def test_horizon_longer_than_config_raises_config_error():
    model = SpaceTime(_CFG, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 32, 2))
    with pytest.raises(ConfigError, match="exceeds the configured horizon 16"):
        model.forecast(x, horizon=17)
    with pytest.raises(ShapeError, match="n_features=2"):
        model.forecast(jnp.zeros((1, 32, 3)))
    with pytest.raises(ConfigError, match="spacetime.state_size"):
        SpaceTimeConfig(state_size=0)
    with pytest.raises(ConfigError, match="spacetime.closed_loop_l1"):
        SpaceTimeConfig(closed_loop_l1=1.0)
    with pytest.raises(ConfigError, match="spacetime.input_transform"):
        SpaceTimeConfig(input_transform="revin")
