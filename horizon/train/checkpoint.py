"""Checkpoints: an Orbax CheckpointManager (async, atomic, keep last N) over the train state.

The data position is the step (batches are a pure function of seed and step), so restoring the
state is all a bit-identical resume needs. A latest checkpoint that cannot be read is reported
and the previous good one is used.
"""

from __future__ import annotations

import pathlib
import warnings

import jax
import orbax.checkpoint as ocp

from horizon.errors import CheckpointError
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
        step = int(jax.device_get(state.step))
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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
