"""experiments.spacetime_forecast runs end to end at tiny size; its DLinear fit equals an independent
least-squares solve and its persistence MSE equals a hand computation."""

import dataclasses
import json
import math

import numpy as np
import pytest

_TINY = dict(series=("ar2", "seasonal_trend"), horizons=(4, 8), lag=24, n_points=400, test_stride=8,
             ma_kernel=5, batch_size=4, d_model=4, state_size=4, n_layers=1, log_every=1)


@pytest.mark.slow
def test_spacetime_forecast_reports_finite_mse_for_every_series_horizon_method(tmp_path):
    from experiments import spacetime_forecast as sf

    cfg = dataclasses.replace(sf.CONFIG, run_dir=str(tmp_path), train=dataclasses.replace(sf.CONFIG.train, steps=3))
    s = sf.Forecast(**_TINY)
    out = sf.run(cfg, s)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mse"] == out["mse"]
    for name in s.series:
        for h in s.horizons:
            cell = result["mse"][name][str(h)]
            assert set(cell) == set(sf.METHODS)
            assert all(math.isfinite(v) and v > 0 for v in cell.values()), (name, h, cell)
    # Persistence by hand: the same normalisation, test origins and last-value forecast.
    x = sf.make_series("ar2", s.n_points, cfg.train.seed)
    cut = int(s.train_fraction * s.n_points)
    z = (x - x[:cut].mean()) / x[:cut].std()
    H = max(s.horizons)
    errs = []
    for t0 in range(cut - s.lag, s.n_points - s.lag - H + 1, s.test_stride):
        last = z[t0 + s.lag - 1]
        errs += [(z[t0 + s.lag + j] - last) ** 2 for j in range(4)]
    np.testing.assert_allclose(result["mse"]["ar2"]["4"]["persistence"], np.mean(errs), rtol=1e-10)
    assert "Reproduced" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "mse_ar2.png").stat().st_size > 0


def test_dlinear_closed_form_fit_equals_independent_lstsq():
    from experiments import spacetime_forecast as sf

    rng = np.random.default_rng(0)
    L, H, N, k = 12, 3, 60, 5
    x, y = rng.normal(size=(N, L)), rng.normal(size=(N, H))
    # Independent decomposition: replicate-padded centred moving average by explicit loop.
    padded = np.concatenate([np.repeat(x[:, :1], (k - 1) // 2, 1), x, np.repeat(x[:, -1:], k // 2, 1)], 1)
    trend = np.stack([padded[:, i:i + k].mean(1) for i in range(L)], 1)
    F = np.concatenate([x - trend, trend, np.ones((N, 1))], 1)
    W_ref = np.linalg.lstsq(F, y, rcond=None)[0]
    W = sf.fit_dlinear(x, y, k)
    np.testing.assert_allclose(W, W_ref, atol=1e-8)
    x_new = rng.normal(size=(7, L))
    t_new = np.stack([np.concatenate([np.repeat(r[:1], 2), r, np.repeat(r[-1:], 2)]) for r in x_new])
    t_new = np.stack([t_new[:, i:i + k].mean(1) for i in range(L)], 1)
    np.testing.assert_allclose(sf.dlinear_predict(W, x_new, k),
                               np.concatenate([x_new - t_new, t_new, np.ones((7, 1))], 1) @ W_ref, atol=1e-8)
    # The fitted map is a least-squares optimum: residuals orthogonal to every feature.
    np.testing.assert_allclose(F.T @ (y - F @ W), 0.0, atol=1e-8)
