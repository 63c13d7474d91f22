"""Resharded restore: a train state checkpointed on one 8-device mesh restores with identical values
onto 4 devices, onto another axis split of 8, and (parameters only) onto one device; a checkpoint
of another model shape is one CheckpointError and leaves the directory untouched."""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from horizon.config import Mesh, Model, to_dict
from horizon.errors import CheckpointError
from horizon.models import load
from horizon.train import loop, sharding
from horizon.train.checkpoint import Checkpointer


def _abstract_state(cfg, devices):
    """(abstract TrainState with shardings on cfg.mesh over devices, mesh), nothing materialised."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    return loop.abstract_train_state(cfg, mesh)[1], mesh


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory holding one checkpoint of a state with distinct random values everywhere,
    written from mesh data=2, fsdp=2, tensor=2 on 8 devices."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from conftest import tiny_experiment

    cfg = tiny_experiment(mesh=Mesh(data=2, fsdp=2, tensor=2))
    run = tmp_path_factory.mktemp("reshard")
    abstract, _ = _abstract_state(cfg, jax.devices())
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(0)
    values = [rng.normal(size=a.shape).astype(a.dtype) if np.issubdtype(a.dtype, np.floating)
              else np.asarray(7, a.dtype) for a in leaves]
    state = jax.tree.unflatten(treedef, [jax.device_put(v, a.sharding) for v, a in zip(values, leaves)])
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(state)
    ckpt.close()
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    return cfg, run, jax.tree.unflatten(treedef, values)


@pytest.mark.parametrize("mesh, n_dev", [(Mesh(data=1, fsdp=4), 4), (Mesh(data=1, fsdp=2, tensor=4), 8)])
def test_state_restores_identically_onto_another_mesh(saved, mesh, n_dev):
    cfg, run, values = saved
    abstract, jmesh = _abstract_state(dataclasses.replace(cfg, mesh=mesh), jax.devices()[:n_dev])
    ckpt = Checkpointer(run / "checkpoints")
    restored = ckpt.restore_latest(abstract, log=lambda m: None)
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(restored), values)
    wq = restored.params["layers"][0]["mixer"]["q"]["kernel"]
    assert wq.sharding.mesh.devices.size == n_dev
    assert wq.sharding.spec == sharding.logical_to_spec(("embed", "heads"))
    assert wq.addressable_shards[0].data.shape == sharding.shard_shape(wq.shape, wq.sharding.spec, jmesh)


def test_load_restores_parameters_on_one_device_or_a_given_mesh(saved):
    from flax import nnx

    cfg, run, values = saved
    for kw in ({}, {"mesh": Mesh(data=1, tensor=2), "devices": jax.devices()[6:]}):
        model, got_cfg = load(run, **kw)
        assert got_cfg.model == cfg.model
        params = nnx.to_pure_dict(nnx.state(model))
        chex.assert_trees_all_equal(jax.device_get(params), values.params)
        devs = {d for x in jax.tree.leaves(params) for d in x.sharding.device_set}
        assert devs == set(kw.get("devices", jax.devices()[:1]))


def test_checkpoint_of_another_shape_is_refused_and_untouched(saved):
    cfg, run, _ = saved
    before = sorted((p.relative_to(run), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*"))
    other = dataclasses.replace(cfg, model=Model(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
                                mesh=Mesh(data=1, fsdp=4))
    abstract, _ = _abstract_state(other, jax.devices()[:4])
    ckpt = Checkpointer(run / "checkpoints")
    with pytest.raises(CheckpointError, match="fits this model"):
        ckpt.restore_latest(abstract, log=lambda m: None)
    with pytest.raises(CheckpointError, match="fit this model"):
        ckpt.restore_params(abstract.params, log=lambda m: None)
    ckpt.close()
    assert sorted((p.relative_to(run), p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
