"""Models: the decoder LM and its blocks; `load(path)` restores a trained model."""

from __future__ import annotations

import json
import pathlib

from horizon.errors import CheckpointError


def load(path, *, mesh=None, devices=None):
    """(model, experiment_config) from a run directory (or its checkpoints/ folder), latest checkpoint.

    Only the parameters are read. By default they land on one device; `mesh` (a horizon.config.Mesh)
    and `devices` (default: all) restore them sharded by the logical rules on that mesh, whatever
    mesh wrote the checkpoint. CheckpointError if there is no checkpoint or it does not fit.
    """
    import jax
    from flax import nnx

    from horizon.config import Experiment, Mesh, from_dict
    from horizon.models.lm import LM
    from horizon.train.checkpoint import Checkpointer
    from horizon.train.sharding import make_mesh, rules, state_shardings

    run_dir = pathlib.Path(path)
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} has no config.json; pass a run directory written by horizon")
    cfg = from_dict(Experiment, json.loads((run_dir / "config.json").read_text()))
    if mesh is None:
        mesh, devices = Mesh(data=-1), jax.devices()[:1] if devices is None else devices
    jmesh = make_mesh(mesh, devices)
    with jax.set_mesh(jmesh):
        with rules():
            abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, abs_state = nnx.split(abstract)
        shardings = nnx.to_pure_dict(state_shardings(abs_state, jmesh))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abs_state), shardings)
        if not (run_dir / "checkpoints").is_dir():
            raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint; train first")
        ckpt = Checkpointer(run_dir / "checkpoints")
        try:
            params = ckpt.restore_params(target)
        finally:
            ckpt.close()
    if params is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint; train first")
    return nnx.merge(graphdef, params), cfg
