"""The training loop: builds everything from an Experiment, resumes from the run directory's
latest checkpoint, logs, evaluates, checkpoints, and saves on SIGTERM.

Run directory: config.json, metrics.jsonl, tensorboard/, checkpoints/ (report.md and plots are
written by the experiment). The same run directory again resumes; a resumed run is bit-identical
to an uninterrupted one because batches are a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import signal
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from horizon.config import Experiment, from_dict, to_dict
from horizon.data.batches import Batches
from horizon.data.corpus import load_store
from horizon.errors import CheckpointError
from horizon.models.lm import LM, count_params
from horizon.train import distributed, sharding
from horizon.train.checkpoint import Checkpointer
from horizon.train.metrics import MetricsWriter, progress_bar
from horizon.train.optim import learning_rate, make_optimizer
from horizon.train.state import TrainState, init_state
from horizon.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class RunResult:
    run_dir: pathlib.Path
    model: LM
    params: dict
    history: list[dict]
    n_params: int
    final_eval_loss: float | None
    stopped_early: bool
    store: object
    heldout: Batches


def resolve_run_dir(cfg: Experiment) -> pathlib.Path:
    if cfg.run_dir:
        return pathlib.Path(cfg.run_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / cfg.name / stamp


def _check_config(run_dir: pathlib.Path, cfg: Experiment, *, write: bool = True) -> None:
    """Write config.json on a fresh run; on resume, refuse a different model or data config.

    Every process checks; only the one with `write` (process 0) writes, atomically, so another
    process never reads a half-written file."""
    path = run_dir / "config.json"
    if path.exists():
        try:
            saved = from_dict(Experiment, json.loads(path.read_text()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path} is unreadable ({e}); use a fresh --run-dir") from None
        for part in ("model", "data"):
            if getattr(saved, part) != getattr(cfg, part):
                raise CheckpointError(
                    f"{run_dir} was written with a different {part} config; resume with the same "
                    f"{part} settings or use a fresh --run-dir")
        if saved.train.seed != cfg.train.seed:
            raise CheckpointError(f"{run_dir} was written with train.seed={saved.train.seed}; resume with it "
                                  "or use a fresh --run-dir")
    if write:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        tmp.replace(path)


class _NullMetrics:
    """The metrics sink of processes other than 0: they compute the same records, write nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def build_model(cfg: Experiment, mesh) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, param shardings); params are created already sharded, never whole on one device."""
    make = lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))  # noqa: E731
    with sharding.rules():
        abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    shardings = nnx.to_pure_dict(sharding.state_shardings(abs_state, mesh))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make())[1]), out_shardings=shardings)()
    return graphdef, params, shardings


def state_shardings(optimizer, params, param_shardings, mesh) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, param_shardings,
                                   transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_sh, step=replicated, n_skipped=replicated,
                      loss_ema=replicated)


def abstract_train_state(cfg: Experiment, mesh) -> tuple[nnx.GraphDef, TrainState, TrainState, dict]:
    """(graphdef, abstract state, state shardings, param shardings) on `mesh` without creating any
    array: ShapeDtypeStructs carrying their shardings (restore targets, ahead-of-time compiles)."""
    with jax.set_mesh(mesh), sharding.rules():
        abstract = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
    graphdef, abs_state = nnx.split(abstract)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abs_state, mesh))
    params = nnx.to_pure_dict(abs_state)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state_sh = state_shardings(optimizer, params, param_sh, mesh)
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh)
    return graphdef, state, state_sh, param_sh


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))


def evaluate(eval_fn, params, heldout: Batches, n_batches: int, put) -> float:
    """Mean held-out loss over fixed batches 0..n-1 of the held-out split."""
    losses = [eval_fn(params, put(heldout.batch(i))) for i in range(n_batches)]
    return float(np.mean([distributed.host_value(x) for x in losses]))


def _late_precision_step(cfg: Experiment, jit_step):
    """(step function, first step) of the late high-precision phase (NVFP4 paper, app. D), or
    (None, steps) when the recipe has none: the same params under a model whose linear layers
    resolve their recipe in the late phase."""
    q = cfg.model.quant
    if q.high_precision_from is None or q.recipe == "bf16":
        return None, cfg.train.steps
    late_cfg = dataclasses.replace(cfg.model, quant=dataclasses.replace(q, high_precision_from=0.0))
    with sharding.rules():
        late_graphdef = nnx.split(nnx.eval_shape(lambda: LM(late_cfg, rngs=nnx.Rngs(0))))[0]
    return jit_step(late_graphdef), int(round(q.high_precision_from * cfg.train.steps))


def train(cfg: Experiment, *, log=print) -> RunResult:
    """Train (or resume) the run `cfg` describes; returns the trained model and its history."""
    distributed.initialize(cfg.distributed, log=log)  # before any device use; no-op for one process
    primary = distributed.is_primary()
    if not primary:  # one voice: process 0 logs, writes metrics and config
        log = lambda *_: None  # noqa: E731
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, cfg, write=primary)
    store = load_store(cfg.data.store)
    train_batches = Batches(store, cfg.data, split="train", seed=cfg.train.seed)
    heldout = Batches(store, cfg.data, split="heldout", seed=cfg.train.seed)

    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_fits(cfg, mesh)
    with jax.set_mesh(mesh):
        graphdef, params, param_sh = build_model(cfg, mesh)
        optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        schedule = learning_rate(cfg.optim, cfg.train.steps)
        state_sh = state_shardings(optimizer, params, param_sh, mesh)
        state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_sh)(params)
        bsh = batch_sharding(mesh)
        put = lambda b: distributed.put_batch(b, bsh)  # noqa: E731
        jit_step = lambda g: jax.jit(make_train_step(g, optimizer, cfg, schedule),  # noqa: E731
                                     in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=0)
        step_fn = jit_step(graphdef)
        late_fn, late_from = _late_precision_step(cfg, jit_step)
        eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(param_sh, bsh))

        ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        restored = ckpt.restore_latest(state, log=log)
        metrics = MetricsWriter(run_dir) if primary else _NullMetrics()
        if restored is not None:
            state = restored
            log(f"resumed from step {int(distributed.host_value(state.step))} in {run_dir}")
        start = int(distributed.host_value(state.step))
        metrics.truncate_after(start)
        n_params = count_params(nnx.merge(graphdef, state.params))
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        bar = progress_bar(cfg.train.steps, start, cfg.train.progress and primary)
        stopped, t_last, steps_since = False, time.perf_counter(), 0
        final_eval = None
        try:
            with _Sigterm() as sigterm:
                for step in range(start, cfg.train.steps):
                    fn = late_fn if late_fn is not None and step >= late_from else step_fn
                    state, m = fn(state, put(train_batches.batch(step)))
                    steps_since += 1
                    done = step + 1
                    if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                        m = jax.tree.map(distributed.host_value, m)
                        now = time.perf_counter()
                        dt = (now - t_last) / steps_since
                        rec = {"step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                               "lr": float(m["lr"]), "skipped": int(distributed.host_value(state.n_skipped)),
                               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt}
                        metrics.write(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                        t_last, steps_since = now, 0
                    bar.update(1)
                    if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                        final_eval = evaluate(eval_fn, state.params, heldout, cfg.train.eval_batches, put)
                        metrics.write({"step": done, "eval_loss": final_eval})
                        t_last = time.perf_counter()
                    if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                        ckpt.save(state)
                    if distributed.any_process(sigterm.requested):  # all processes stop at the same step
                        log(f"SIGTERM: saving step {done} to {run_dir / 'checkpoints'} and stopping")
                        ckpt.save(state, force=True)
                        stopped = True
                        break
        finally:
            bar.close()
            ckpt.close()
            metrics.close()
    from horizon.train.metrics import read_metrics

    return RunResult(run_dir=run_dir, model=nnx.merge(graphdef, state.params), params=state.params,
                     history=read_metrics(run_dir) if primary else [], n_params=n_params, final_eval_loss=final_eval,
                     stopped_early=stopped, store=store, heldout=heldout)
