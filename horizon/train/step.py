"""Pure train and eval steps over (TrainState, batch); jitted by the caller with shardings.

A step whose loss or gradient norm is not finite (or, optionally, whose loss spikes above
`skip_spike_factor` x the running mean) leaves params and optimizer state unchanged and is counted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from horizon.config import Experiment
from horizon.models.heads import next_token_loss, objective_loss
from horizon.train.state import TrainState


def quant_key(seed: int, step: jax.Array) -> jax.Array:
    """Per-step key for stochastic rounding; layers fold in their GEMM id."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def make_loss_fn(graphdef, *, objective: bool = True):
    """loss(params, batch, key): the model config's objective (horizon.models.heads.objective_loss)
    when it adds MTP or HLP terms and `objective` is set, else next-token cross-entropy."""

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        if objective and not model.cfg.objective.is_next_token:
            return objective_loss(model, batch, key)
        logits = model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"],
                       quant_key=key)
        return next_token_loss(logits, batch["targets"], batch["weights"])

    return loss_fn


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: Experiment, schedule):
    loss_fn = make_loss_fn(graphdef)
    spike = cfg.optim.skip_spike_factor

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, quant_key(cfg.train.seed, state.step))
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if spike is not None:
            ok &= (state.loss_ema == 0) | (loss <= spike * state.loss_ema)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        ema = jnp.where(state.loss_ema == 0, loss, 0.95 * state.loss_ema + 0.05 * loss)
        new = TrainState(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            n_skipped=state.n_skipped + (~ok).astype(jnp.int32),
            loss_ema=jnp.where(ok, ema, state.loss_ema),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": ~ok}
        return new, metrics

    return train_step


def make_eval_step(graphdef):
    # Held-out loss is next-token cross-entropy whatever the training objective, so runs compare.
    loss_fn = make_loss_fn(graphdef, objective=False)

    def eval_step(params, batch):
        return loss_fn(params, batch, None)

    return eval_step
