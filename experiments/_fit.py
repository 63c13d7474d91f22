"""Shared by the long-context experiments: a bare training run (horizon's train step on one device,
any batch source, optional starting parameters) for comparisons that need no checkpoints, and the
run directory of an experiment."""

from __future__ import annotations

import datetime
import json
import pathlib

import jax
import jax.numpy as jnp

from horizon.config import Experiment, Mesh, to_dict


def run_dir_for(cfg: Experiment) -> pathlib.Path:
    """cfg.run_dir, or runs/<name>/<timestamp>; created, with config.json written."""
    d = pathlib.Path(cfg.run_dir or pathlib.Path("runs") / cfg.name / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return d


def fit(cfg: Experiment, batches, *, params=None, log=print):
    """cfg.train.steps steps of horizon.train.step on one device over `batches.batch(step)`, from
    `params` (a pure dict with this model's structure; default: a fresh init). Returns (model, losses)."""
    from flax import nnx

    from horizon.models.lm import LM
    from horizon.train import sharding
    from horizon.train.loop import build_model
    from horizon.train.optim import learning_rate, make_optimizer
    from horizon.train.state import init_state
    from horizon.train.step import make_train_step

    mesh = sharding.make_mesh(Mesh(data=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        if params is None:
            graphdef, params, _ = build_model(cfg, mesh)
        else:  # a fine-tune: the same parameters under another model config
            with sharding.rules():
                graphdef = nnx.split(nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0))))[0]
            params = jax.tree.map(jnp.copy, params)  # the step donates its state
        opt = make_optimizer(cfg.optim, cfg.train.steps)
        step_fn = jax.jit(make_train_step(graphdef, opt, cfg, learning_rate(cfg.optim, cfg.train.steps)),
                          donate_argnums=0)
        state = init_state(params, opt)
        losses = []
        for step in range(cfg.train.steps):
            state, m = step_fn(state, {k: jnp.asarray(v) for k, v in batches.batch(step).items()})
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                losses.append((step + 1, float(m["loss"])))
                log(f"  step {step + 1}: loss {losses[-1][1]:.3f}")
    return nnx.merge(graphdef, state.params), losses


def params_of(model) -> dict:
    """A model's parameters as a pure dict (what `fit` starts from)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model))
