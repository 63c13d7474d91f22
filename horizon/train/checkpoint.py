"""Checkpoints: an Orbax CheckpointManager (async, atomic, keep last N) over the train state.

The data position is the step (batches are a pure function of seed and step), so restoring the
state is all a bit-identical resume needs. A latest checkpoint that cannot be read is reported
and the previous good one is used. Restores are resharded: a checkpoint written on one mesh
(or number of processes) restores onto whatever shardings the target carries.
"""

from __future__ import annotations

import pathlib
import warnings

import jax
import orbax.checkpoint as ocp

from horizon.errors import CheckpointError
from horizon.train.distributed import host_value
from horizon.train.state import TrainState


def _as_tree(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "n_skipped": state.n_skipped, "loss_ema": state.loss_ema}


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, *, force: bool = False) -> None:
        step = int(host_value(state.step))  # every process calls save: Orbax writes each one's shards
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract: TrainState, *, log=print) -> TrainState | None:
        """The newest readable checkpoint restored onto `abstract`'s shapes and shardings, or None.

        CheckpointError if checkpoints exist but none fits the model (a different config wrote them).
        """
        steps = self.steps()
        if not steps:
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _as_tree(abstract))
        errors = []
        for step in reversed(steps):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = self.manager.restore(step, args=ocp.args.StandardRestore(target))
                return TrainState(**tree)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
                msg = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
                errors.append((step, msg))
                log(f"checkpoint at step {step} in {self.directory} is unreadable ({msg}); trying the previous one")
        raise CheckpointError(
            f"no checkpoint in {self.directory} fits this model (newest error: {errors[0][1]}); "
            "use a fresh --run-dir or the config that wrote them")

    def restore_params(self, abstract_params, *, log=print):
        """The parameters alone (no optimizer state) of the newest readable checkpoint, restored onto
        `abstract_params`' shapes and shardings (any mesh: Orbax reshards), or None if there is none.

        CheckpointError if checkpoints exist but none has parameters of these shapes."""
        steps = self.steps()
        if not steps:
            return None
        target = {"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_params)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        errors = []
        for step in reversed(steps):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = self.manager.restore(step, args=ocp.args.PyTreeRestore(
                        item=target, restore_args=restore_args, partial_restore=True))
                _check_shapes(tree["params"], target["params"])
                return tree["params"]
            except Exception as e:  # noqa: BLE001 - unreadable: fall back to the previous one
                msg = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
                errors.append((step, msg))
                log(f"checkpoint at step {step} in {self.directory} is unreadable ({msg}); trying the previous one")
        raise CheckpointError(
            f"no checkpoint in {self.directory} has parameters that fit this model (newest error: "
            f"{errors[0][1]}); load it with the config that wrote it")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(directory: str | pathlib.Path, params, *, step: int = 0) -> None:
    """A parameters-only checkpoint (imports, exports) that `Checkpointer.restore_params` and
    horizon.models.load read; a run resumed from it starts a fresh optimizer."""
    manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    manager.save(step, args=ocp.args.StandardSave({"params": params}))
    manager.wait_until_finished()
    manager.close()


def _check_shapes(restored, target) -> None:
    """Orbax may pad or truncate on a shape mismatch; a checkpoint of another shape is an error."""
    bad = [(jax.tree_util.keystr(k), a.shape, b.shape)
           for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target))
           if a.shape != b.shape]
    if bad:
        raise CheckpointError(f"parameter {bad[0][0]} has shape {bad[0][1]} in the checkpoint, {bad[0][2]} in the model")
