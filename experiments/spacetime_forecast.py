"""SpaceTime long-horizon forecasting at toy scale (Zhang et al., "Effectively Modeling Time Series
with Simple Discrete State Spaces", ICLR 2023) against DLinear (Zeng et al., AAAI 2023) and persistence.

Claim: the closed-loop companion SSM forecasts long horizons (96 to 720 steps from a lag of 336) at
least as well as a linear baseline and beats persistence. Data are synthetic (numpy, from the seed):
two stable AR processes and a seasonal (periods 24 and 168) plus linear-trend series, each split in
time, normalised by the train split's mean and standard deviation. As in the official code, SpaceTime
removes each lag window's mean and adds it back to the forecast, and its closed-loop matrix is a
companion matrix with l1-bounded column, so its spectral radius is below 1 (horizon.ssm.spacetime).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from horizon.config import Experiment, Optim, Train
from horizon.errors import ConfigError
from horizon.eval.report import markdown_table, plot_curves, write_json
from horizon.train.loop import resolve_run_dir

METHODS = ("spacetime", "dlinear", "persistence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Forecast:
    """Forecasting settings (the Experiment carries only name, claim, steps, seed, lr and run_dir)."""

    series: tuple[str, ...] = ("ar2", "ar4", "seasonal_trend")
    horizons: tuple[int, ...] = (96, 192, 336, 720)
    lag: int = 336
    n_points: int = 8000  # length of each synthetic series
    train_fraction: float = 0.7  # the first 70% (in time) trains, the rest is the test split
    test_stride: int = 24  # spacing of test forecast origins
    ma_kernel: int = 25  # DLinear's moving-average window
    batch_size: int = 16
    d_model: int = 16
    state_size: int = 32
    n_layers: int = 1
    input_transform: str = "mean"  # SpaceTime's per-window level removal (the official default)
    log_every: int = 25


SETTINGS = Forecast()

CONFIG = Experiment(
    name="spacetime_forecast",
    claim="closed-loop SpaceTime forecasts horizons 96-720 at least as well as DLinear and beats persistence",
    optim=Optim(lr=3e-3),
    train=Train(steps=100, progress=False),
)


# --- data ----------------------------------------------------------------------------------------


def _ar(rng, n: int, roots: list[complex], noise: float, burn: int = 500) -> np.ndarray:
    """AR(p) with the given (stable, |r| < 1) characteristic roots plus Gaussian innovations."""
    coef = -np.real(np.poly(roots))[1:]  # x_t = sum_i coef_i x_{t-1-i} + e_t
    p, x = len(coef), np.zeros(n + burn)
    e = rng.normal(0.0, noise, n + burn)
    for t in range(p, n + burn):
        x[t] = coef @ x[t - p:t][::-1] + e[t]
    return x[burn:]


def make_series(name: str, n: int, seed: int) -> np.ndarray:
    """One synthetic series [n] (float64), deterministic in (name, seed)."""
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    t = np.arange(n, dtype=np.float64)
    if name == "ar2":
        r = 0.97 * np.exp(2j * np.pi / 48)
        return _ar(rng, n, [r, r.conjugate()], 1.0)
    if name == "ar4":
        r1, r2 = 0.98 * np.exp(2j * np.pi / 24), 0.95 * np.exp(2j * np.pi / 120)
        return _ar(rng, n, [r1, r1.conjugate(), r2, r2.conjugate()], 1.0)
    if name == "seasonal_trend":
        season = np.sin(2 * np.pi * t / 24) + 0.5 * np.sin(2 * np.pi * t / 168 + 1.0)
        return season + 1.5 * t / n + rng.normal(0.0, 0.3, n)
    raise ConfigError(f"series {name!r} is not one of ar2, ar4, seasonal_trend")


def windows(x: np.ndarray, starts: np.ndarray, lag: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Lag windows [N, lag] and their next-`horizon` targets [N, horizon] starting at `starts`."""
    idx = starts[:, None] + np.arange(lag + horizon)[None]
    w = x[idx]
    return w[:, :lag], w[:, lag:]


def split(x: np.ndarray, s: Forecast, horizon: int):
    """(z, cut, test starts): the series normalised by its train part x[:cut]; test forecasts
    start at or after cut (their lag window may reach back into the train part)."""
    cut = int(s.train_fraction * len(x))
    mu, sd = x[:cut].mean(), x[:cut].std()
    test_starts = np.arange(cut - s.lag, len(x) - s.lag - horizon + 1, s.test_stride)
    if len(train_starts(cut, s, horizon)) < 1 or len(test_starts) < 1:
        raise ConfigError(f"n_points={len(x)} is too short for lag {s.lag} + horizon {horizon}")
    return (x - mu) / sd, cut, test_starts


def train_starts(cut: int, s: Forecast, horizon: int) -> np.ndarray:
    """Starts of the windows (lag + horizon) lying wholly before the split point."""
    return np.arange(0, cut - s.lag - horizon + 1)


# --- baselines -----------------------------------------------------------------------------------


def moving_average(x_NL: np.ndarray, kernel: int) -> np.ndarray:
    """DLinear's trend: a centred moving average with the ends replicated ([N, L] -> [N, L])."""
    front, back = (kernel - 1) // 2, kernel // 2
    pad = np.concatenate([np.repeat(x_NL[:, :1], front, 1), x_NL, np.repeat(x_NL[:, -1:], back, 1)], 1)
    c = np.cumsum(np.pad(pad, ((0, 0), (1, 0))), axis=1)
    return (c[:, kernel:] - c[:, :-kernel]) / kernel


def _dlinear_features(x_NL, kernel):
    trend = moving_average(x_NL, kernel)
    return np.concatenate([x_NL - trend, trend, np.ones((len(x_NL), 1))], 1)


def fit_dlinear(x_NL: np.ndarray, y_NH: np.ndarray, kernel: int) -> np.ndarray:
    """DLinear in closed form: y = W_s seasonal + W_t trend + bias, by (minimum-norm) least squares.
    Returns W [2L + 1, H]: rows [:L] seasonal map, [L:2L] trend map, last row bias."""
    return np.linalg.lstsq(_dlinear_features(x_NL, kernel), y_NH, rcond=None)[0]


def dlinear_predict(W: np.ndarray, x_NL: np.ndarray, kernel: int) -> np.ndarray:
    return _dlinear_features(x_NL, kernel) @ W


def persistence(x_NL: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat the last observed value."""
    return np.repeat(x_NL[:, -1:], horizon, 1)


# --- SpaceTime -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _spacetime_fns(s: Forecast, horizon: int, lr: float):
    """(init(seed) -> (params, opt_state), jitted step, jitted forecast), built once per shape so
    every series reuses one compilation."""
    import jax
    import optax
    from flax import nnx

    from horizon.ssm.spacetime import SpaceTime, SpaceTimeConfig

    st_cfg = SpaceTimeConfig(n_features=1, d_model=s.d_model, state_size=s.state_size, n_layers=s.n_layers,
                             horizon=horizon, input_transform=s.input_transform)
    graphdef = nnx.split(nnx.eval_shape(lambda: SpaceTime(st_cfg, rngs=nnx.Rngs(0))))[0]
    opt = optax.adam(lr)

    def init(seed):
        params = nnx.split(SpaceTime(st_cfg, rngs=nnx.Rngs(seed)))[1]
        return params, opt.init(params)

    def loss_fn(params, x, y):
        return nnx.merge(graphdef, params).loss(x, y)[0]

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def forecast(params, x):
        return nnx.merge(graphdef, params).forecast(x)

    return init, step, forecast


def train_spacetime(z, starts, s: Forecast, horizon: int, cfg: Experiment):
    """Adam on random train windows for cfg.train.steps steps. Returns (forecast fn [N, lag] ->
    [N, horizon], [(step, loss)])."""
    import jax.numpy as jnp

    init, step, forecast = _spacetime_fns(s, horizon, cfg.optim.lr)
    params, opt_state = init(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    losses = []
    for i in range(cfg.train.steps):
        x, y = windows(z, rng.choice(starts, s.batch_size), s.lag, horizon)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x[..., None], jnp.float32),
                                       jnp.asarray(y[..., None], jnp.float32))
        if (i + 1) % s.log_every == 0 or i + 1 == cfg.train.steps:
            losses.append((i + 1, float(loss)))

    def predict(x_NL):
        return np.asarray(forecast(params, jnp.asarray(x_NL[..., None], jnp.float32)))[..., 0]

    return predict, losses


# --- the experiment ------------------------------------------------------------------------------


def _mse(pred, y):
    return float(np.mean((pred - y) ** 2))


def run(cfg: Experiment = CONFIG, settings: Forecast = SETTINGS) -> dict:
    """One SpaceTime model per series, trained at the longest horizon (closed-loop loss over all of
    it) and evaluated on prefixes; one DLinear fit per series likewise (shorter horizons are column
    prefixes); every method scored on the same test windows (origins chosen for the longest horizon)."""
    s = settings
    root = resolve_run_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    H = max(s.horizons)
    mse, rows, train_curves = {}, [], {}
    for name in s.series:
        t0 = time.time()
        z, cut, test_starts = split(make_series(name, s.n_points, cfg.train.seed), s, H)
        x_test, y_test = windows(z, test_starts, s.lag, H)
        predict, losses = train_spacetime(z, train_starts(cut, s, H), s, H, cfg)
        st_pred = predict(x_test)
        train_curves[name] = tuple(zip(*losses))
        # Least squares is separable per output column, so one DLinear fit at the longest horizon on
        # the same train windows as SpaceTime gives every shorter horizon's fit as a column prefix.
        W = fit_dlinear(*windows(z, train_starts(cut, s, H), s.lag, H), s.ma_kernel)
        dl_pred = dlinear_predict(W, x_test, s.ma_kernel)
        mse[name] = {}
        for h in s.horizons:
            mse[name][str(h)] = {
                "spacetime": _mse(st_pred[:, :h], y_test[:, :h]),
                "dlinear": _mse(dl_pred[:, :h], y_test[:, :h]),
                "persistence": _mse(persistence(x_test, h), y_test[:, :h]),
            }
            r = mse[name][str(h)]
            rows.append([name, h, r["spacetime"], r["dlinear"], r["persistence"],
                         "yes" if r["spacetime"] <= 1.05 * r["dlinear"] else "no",
                         "yes" if r["spacetime"] < r["persistence"] else "no"])
        print(f"  {name}: {time.time() - t0:.0f}s, final train loss {losses[-1][1]:.3f}")
    for name in s.series:
        plot_curves(root / f"mse_{name}.png",
                    {m: (list(s.horizons), [mse[name][str(h)][m] for h in s.horizons]) for m in METHODS},
                    xlabel="horizon", ylabel="test MSE (normalised units)", title=f"{cfg.name}: {name}")
    plot_curves(root / "loss.png", train_curves, xlabel="step", ylabel="train loss (horizon + next-step MSE)",
                title=f"{cfg.name}: SpaceTime training")
    vs_linear = all(r[5] == "yes" for r in rows)
    vs_persist = all(r[6] == "yes" for r in rows)
    reproduced = vs_linear and vs_persist
    report = [
        f"# {cfg.name}", "", f"Claim: {cfg.claim} (Zhang et al., ICLR 2023).", "",
        f"Setup: series {', '.join(s.series)} ({s.n_points} points each, first {s.train_fraction:.0%} train, "
        f"normalised by train statistics); lag {s.lag}; test origins every {s.test_stride} steps. SpaceTime: "
        f"one model per series (d_model {s.d_model}, state {s.state_size}, {s.n_layers} encoder layer(s), "
        f"window level removed: {s.input_transform}, closed-loop spectral radius < 1 by construction), "
        f"trained {cfg.train.steps} Adam steps (lr {cfg.optim.lr}, batch {s.batch_size}) at horizon {H} and "
        f"scored on prefixes. DLinear: moving average {s.ma_kernel}, closed-form least squares on the same train windows. "
        "Persistence: last value repeated.", "",
        markdown_table(["series", "horizon", "SpaceTime MSE", "DLinear MSE", "persistence MSE",
                        "SpaceTime <= 1.05 x DLinear", "SpaceTime < persistence"], rows), "",
        f"SpaceTime at least as good as DLinear (within 5%) everywhere: **{'yes' if vs_linear else 'no'}**; "
        f"beats persistence everywhere: **{'yes' if vs_persist else 'no'}**. "
        f"Reproduced: **{'yes' if reproduced else 'no'}**.", "",
        *[f"![{n}](mse_{n}.png)" for n in s.series], "", "![training loss](loss.png)", "",
    ]
    (root / "report.md").write_text("\n".join(report))
    result = {"mse": mse, "spacetime_at_least_dlinear": vs_linear, "spacetime_beats_persistence": vs_persist,
              "reproduced": reproduced, "settings": dataclasses.asdict(s), "steps": cfg.train.steps}
    write_json(root / "result.json", result)
    print("\n".join(report[4:9]))
    return result


if __name__ == "__main__":
    from horizon.cli import experiment_main

    experiment_main(__name__)
