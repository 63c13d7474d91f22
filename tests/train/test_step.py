"""The train step: sharded over 8 devices equals one device; a non-finite step is skipped and
counted; learning-rate schedules match their closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.config import Mesh, Optim
from horizon.data.batches import Batches
from horizon.data.corpus import load_store
from horizon.train import loop, sharding
from horizon.train.optim import learning_rate, make_optimizer
from horizon.train.state import init_state
from horizon.train.step import make_train_step


def _setup(cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
        graphdef, params, psh = loop.build_model(cfg, mesh)
        opt = make_optimizer(cfg.optim, cfg.train.steps)
        ssh = loop.state_shardings(opt, params, psh, mesh)
        state = jax.jit(lambda p: init_state(p, opt), out_shardings=ssh)(params)
        bsh = loop.batch_sharding(mesh)
        fn = jax.jit(make_train_step(graphdef, opt, cfg, learning_rate(cfg.optim, cfg.train.steps)),
                     in_shardings=(ssh, bsh), out_shardings=(ssh, None))
    return mesh, state, fn, bsh


def _run(cfg, devices, batches, n):
    mesh, state, fn, bsh = _setup(cfg, devices)
    losses = []
    with jax.set_mesh(mesh):
        for i in range(n):
            state, m = fn(state, jax.device_put({k: jnp.asarray(v) for k, v in batches.batch(i).items()}, bsh))
            losses.append(float(m["loss"]))
    return jax.device_get(state), losses


@pytest.mark.parametrize("mesh8", [Mesh(data=2, fsdp=2, tensor=2), Mesh(data=2, tensor=2, context=2)],
                         ids=["data-fsdp-tensor", "data-tensor-context"])
def test_sharded_step_on_8_devices_matches_single_device(tiny, mesh8):
    assert len(jax.devices()) == 8
    cfg8 = tiny(mesh=mesh8)
    cfg1 = tiny(mesh=Mesh(data=1))
    batches = Batches(load_store(None), cfg8.data, split="train", seed=0)
    s8, l8 = _run(cfg8, jax.devices(), batches, 3)
    s1, l1 = _run(cfg1, jax.devices()[:1], batches, 3)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    chex.assert_trees_all_close(s8.params, s1.params, rtol=2e-5, atol=2e-6)


def test_parameters_are_actually_sharded(tiny):
    cfg = tiny(mesh=Mesh(data=2, fsdp=2, tensor=2))
    _, state, _, _ = _setup(cfg, jax.devices())
    wq = state.params["layers"][0]["mixer"]["q"]["kernel"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (wq.shape[0] // 2, wq.shape[1] // 2)


def test_non_finite_step_is_skipped_and_counted(tiny):
    cfg = tiny(mesh=Mesh(data=1))
    mesh, state, fn, bsh = _setup(cfg, jax.devices()[:1])
    batches = Batches(load_store(None), cfg.data, split="train", seed=0)
    put = lambda b: jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, bsh)  # noqa: E731
    with jax.set_mesh(mesh):
        state, _ = fn(state, put(batches.batch(0)))
        before = jax.device_get(state)
        bad = batches.batch(1)
        bad["weights"] = bad["weights"].copy()
        bad["weights"][0, 3] = np.nan  # a non-finite loss and gradient
        state, m = fn(state, put(bad))
        assert not np.isfinite(float(m["loss"])) and bool(m["skipped"])
        after = jax.device_get(state)
        chex.assert_trees_all_equal(after.params, before.params)
        chex.assert_trees_all_equal(after.opt_state, before.opt_state)
        assert int(after.n_skipped) == 1 and int(after.step) == 2
        state, m = fn(state, put(batches.batch(2)))
        assert np.isfinite(float(m["loss"])) and not bool(m["skipped"])
        assert not np.array_equal(np.asarray(jax.device_get(state).params["final_norm"]["scale"]),
                                  np.asarray(before.params["final_norm"]["scale"]))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_schedules_match_closed_forms(schedule):
    cfg = Optim(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    total = 100
    lr = learning_rate(cfg, total)

    def expected(t):
        if t < 10:
            return t / 10
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
        return 1.0 if t < 80 else 1.0 - 0.9 * (t - 80) / 20

    for t in (0, 5, 10, 30, 79, 80, 90, 99):
        assert abs(float(lr(t)) - expected(t)) < 1e-5, (schedule, t)
