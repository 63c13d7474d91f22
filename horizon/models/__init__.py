"""Models: the decoder LM and its blocks; `load(path)` restores a trained model."""

from __future__ import annotations

import json
import pathlib

from horizon.errors import CheckpointError


def load(path):
    """(model, experiment_config) from a run directory (or its checkpoints/ folder), latest checkpoint."""
    import jax
    from flax import nnx

    from horizon.config import Experiment, from_dict
    from horizon.train.checkpoint import Checkpointer
    from horizon.train.loop import build_model, state_shardings
    from horizon.train.optim import make_optimizer
    from horizon.train.sharding import make_mesh
    from horizon.train.state import init_state

    run_dir = pathlib.Path(path)
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} has no config.json; pass a run directory written by horizon")
    cfg = from_dict(Experiment, json.loads((run_dir / "config.json").read_text()))
    mesh = make_mesh(cfg.mesh.__class__(data=-1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        graphdef, params, psh = build_model(cfg, mesh)
        opt = make_optimizer(cfg.optim, cfg.train.steps)
        abstract = jax.eval_shape(lambda p: init_state(p, opt), params)
        sh = state_shardings(opt, params, psh, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        ckpt = Checkpointer(run_dir / "checkpoints")
        state = ckpt.restore_latest(abstract)
        ckpt.close()
    if state is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint; train first")
    return nnx.merge(graphdef, state.params), cfg
