"""Objectives: multi-token and horizon-length losses equal values worked out by hand on tiny inputs;
the objective wiring in the model (MTP heads see no token beyond the one they predict, the main
parameters are untouched by adding heads, the default loss is plain next-token)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import Model, Objective
from horizon.errors import ConfigError
from horizon.models.heads import (
    future_targets,
    horizon_length_loss,
    multi_token_loss,
    next_token_loss,
    objective_loss,
)
from horizon.models.lm import LM
from horizon.train.step import make_loss_fn


def _ce2(l0, l1, target):
    """Cross-entropy of a 2-way softmax by hand."""
    z = math.log(math.exp(l0) + math.exp(l1))
    return z - (l0 if target == 0 else l1)


def test_future_targets_shift_and_chain_weights_by_hand():
    targets = jnp.array([[5, 6, 7, 8, 9]])
    weights = jnp.array([[1.0, 1.0, 0.0, 1.0, 1.0]])  # a document boundary after input 2
    t1, w1 = future_targets(targets, weights, 1)
    np.testing.assert_array_equal(np.asarray(t1), [[6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(np.asarray(w1), [[1, 0, 0, 1, 0]])
    t2, w2 = future_targets(targets, weights, 2)
    np.testing.assert_array_equal(np.asarray(t2), [[7, 8, 9, 0, 0]])
    np.testing.assert_array_equal(np.asarray(w2), [[0, 0, 0, 0, 0]])


def test_multi_token_loss_equals_hand_computation():
    # T = 3, V = 2, depths 1 and 2. Depth 1 predicts targets[t + 1], depth 2 targets[t + 2].
    targets = jnp.array([[0, 1, 1]])
    weights = jnp.ones((1, 3))
    d1 = jnp.array([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    d2 = jnp.array([[[1.0, 3.0], [0.0, 0.0], [0.0, 0.0]]])
    # depth 1: positions 0, 1 live (targets 1, 1); depth 2: position 0 live (target 1)
    want_d1 = (_ce2(0.0, 1.0, 1) + _ce2(2.0, 0.0, 1)) / 2
    want_d2 = _ce2(1.0, 3.0, 1)
    got = float(multi_token_loss([d1, d2], targets, weights))
    assert abs(got - (want_d1 + want_d2) / 2) < 1e-6


def test_horizon_length_loss_equals_hand_computation():
    pred = jnp.array([[0.5, 0.2, 0.9, 0.4]])
    tgt = jnp.array([[1.0, 0.5, 0.0, 0.0]])
    w = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    assert abs(float(horizon_length_loss(pred, tgt, w)) - (0.5 + 0.3 + 0.9) / 3) < 1e-6


CFG = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 64}


def _batch(T=12, seed=0, hlp=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, size=(2, T + 1))
    b = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.broadcast_to(np.arange(T), (2, T)),
         "segment_ids": np.zeros((2, T), np.int32), "weights": np.ones((2, T), np.float32)}
    if hlp:
        b["hlp_targets"] = rng.random((2, T)).astype(np.float32)
        b["hlp_weights"] = (rng.random((2, T)) < 0.5).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_adding_heads_leaves_the_main_parameters_and_the_default_loss_unchanged():
    plain = LM(Model(**CFG), rngs=nnx.Rngs(0))
    mtp = LM(Model(**CFG, objective=Objective(mtp="sequential", mtp_depth=2)), rngs=nnx.Rngs(0))
    p_plain, p_mtp = nnx.to_pure_dict(nnx.state(plain)), nnx.to_pure_dict(nnx.state(mtp))
    jax.tree.map(np.testing.assert_array_equal, p_plain, {k: p_mtp[k] for k in p_plain})
    batch = _batch()
    graphdef, params = nnx.split(plain)
    want = next_token_loss(plain(batch["inputs"]), batch["targets"], batch["weights"])
    assert float(make_loss_fn(graphdef)(params, batch, None)) == float(want)
    # and with the MTP weight at 0 the objective is the next-token loss of the same trunk
    zero = LM(Model(**CFG, objective=Objective(mtp="parallel", mtp_weight=0.0)), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(float(objective_loss(zero, batch)), float(want), rtol=1e-6)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_mtp_objective_is_next_token_plus_weighted_mean_of_depth_losses(kind):
    model = LM(Model(**CFG, objective=Objective(mtp=kind, mtp_depth=2, mtp_weight=0.3)), rngs=nnx.Rngs(1))
    batch = _batch(seed=1)
    trunk = model.trunk(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    depth_logits = model.mtp(model, trunk, batch["inputs"], positions_BT=batch["positions"],
                             segment_ids_BT=batch["segment_ids"])
    t1, w1 = future_targets(batch["targets"], batch["weights"], 1)
    t2, w2 = future_targets(batch["targets"], batch["weights"], 2)
    want = (next_token_loss(model(batch["inputs"]), batch["targets"], batch["weights"])
            + 0.3 * (next_token_loss(depth_logits[0], t1, w1) + next_token_loss(depth_logits[1], t2, w2)) / 2)
    np.testing.assert_allclose(float(objective_loss(model, batch)), float(want), rtol=1e-6)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_depth_d_prediction_at_t_sees_no_token_after_t_plus_d(kind):
    """Depth d at t predicts token t + 1 + d; its logits may read inputs up to t + d only."""
    model = LM(Model(**CFG, objective=Objective(mtp=kind, mtp_depth=2)), rngs=nnx.Rngs(2))
    batch = _batch(seed=2)
    t = 4

    def depth_logits(inputs):
        kw = {"positions_BT": batch["positions"], "segment_ids_BT": batch["segment_ids"]}
        return model.mtp(model, model.trunk(inputs, **kw), inputs, **kw)

    base = depth_logits(batch["inputs"])
    for d in (1, 2):
        changed = batch["inputs"].at[:, t + d + 1:].set((batch["inputs"][:, t + d + 1:] + 7) % 64)
        np.testing.assert_array_equal(np.asarray(depth_logits(changed)[d - 1][:, :t + 1]),
                                      np.asarray(base[d - 1][:, :t + 1]))
    if kind == "sequential":  # the module for depth 1 does read token t + 1 (it is fed its embedding)
        changed = batch["inputs"].at[:, t + 1].set((batch["inputs"][:, t + 1] + 7) % 64)
        assert not np.allclose(np.asarray(depth_logits(changed)[0][:, t]), np.asarray(base[0][:, t]))


def test_hlp_objective_adds_weighted_l1_of_the_head():
    model = LM(Model(**CFG, objective=Objective(hlp_weight=2.0)), rngs=nnx.Rngs(3))
    batch = _batch(seed=3, hlp=True)
    h = model.hidden(batch["inputs"])
    want = (next_token_loss(model.logits(h), batch["targets"], batch["weights"])
            + 2.0 * horizon_length_loss(model.hlp(h), batch["hlp_targets"], batch["hlp_weights"]))
    np.testing.assert_allclose(float(objective_loss(model, batch)), float(want), rtol=1e-6)
    graphdef, params = nnx.split(model)
    eval_loss = make_loss_fn(graphdef, objective=False)(params, batch, None)  # eval: next-token only
    np.testing.assert_allclose(float(eval_loss), float(next_token_loss(model.logits(h), batch["targets"],
                                                                       batch["weights"])), rtol=1e-6)


@pytest.mark.parametrize("make, field", [
    (lambda: Objective(mtp="lookahead"), "model.objective.mtp"),
    (lambda: Objective(mtp="parallel", mtp_depth=0), "model.objective.mtp_depth"),
    (lambda: Objective(hlp_weight=-1.0), "model.objective.hlp_weight"),
])
def test_bad_objective_config_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()
