"""The LM under a quantization recipe: linear layers get their treatment from config by path
(first and last blocks stay high precision under nvfp4), the model trains, and the late
high-precision switch (NVFP4 paper, app. D) changes only the forward GEMM's treatment."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from horizon.config import Model, Quant
from horizon.models.lm import LM
from horizon.quant.dot import quantized_dot


def _cfg(recipe, **q):
    return Model(d_model=64, n_layers=4, n_heads=4, vocab_size=64, quant=Quant(recipe=recipe, **q))


def test_nvfp4_keeps_first_and_last_blocks_high_precision():
    model = LM(_cfg("nvfp4"), rngs=nnx.Rngs(0))
    kinds = [(blk.mixer.q.recipe is None, blk.mlp.down.recipe is None) for blk in model.layers]
    assert kinds[0] == (True, True) and kinds[-1] == (True, True)
    assert kinds[1] == (False, False) and kinds[2] == (False, False)
    assert all(blk.mixer.q.recipe is None for blk in LM(_cfg("bf16"), rngs=nnx.Rngs(0)).layers)


def test_quantized_linear_equals_quantized_dot_and_differs_from_high_precision():
    model = LM(_cfg("nvfp4"), rngs=nnx.Rngs(0))
    lin = model.layers[1].mlp.up
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 64))
    key = jax.random.PRNGKey(7)
    y = lin(x, quant_key=key)
    expected = quantized_dot(x, lin.kernel[...], lin.recipe, jax.random.fold_in(key, lin.gemm_id))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert not np.allclose(np.asarray(y), np.asarray(x @ lin.kernel[...]), atol=1e-4)


def test_late_switch_makes_fprop_high_precision_only():
    early = LM(_cfg("nvfp4", high_precision_from=0.8), rngs=nnx.Rngs(0)).layers[1].mlp.up.recipe
    late_cfg = _cfg("nvfp4", high_precision_from=0.0)
    late = LM(late_cfg, rngs=nnx.Rngs(0)).layers[1].mlp.up.recipe
    assert early.fprop.quantized and not late.fprop.quantized
    assert late.wgrad == early.wgrad and late.dgrad == early.dgrad
    all_hp = LM(dataclasses.replace(late_cfg, quant=Quant(recipe="nvfp4", high_precision_from=0.0,
                                                          high_precision_scope="all")), rngs=nnx.Rngs(0))
    assert all_hp.layers[1].mlp.up.recipe is None


def test_quantized_model_gradients_are_finite_and_loss_close_to_bf16():
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 33), 0, 64)

    def loss(model):
        logits = model(tokens[:, :-1], quant_key=jax.random.PRNGKey(3))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    q, b = LM(_cfg("nvfp4"), rngs=nnx.Rngs(0)), LM(_cfg("bf16"), rngs=nnx.Rngs(0))
    lq, gq = nnx.value_and_grad(loss)(q)
    lb, _ = nnx.value_and_grad(loss)(b)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(gq))
    assert abs(float(lq) - float(lb)) < 0.05 * float(lb) and float(lq) != float(lb)


def test_rules_match_the_model_without_warnings_and_a_dead_rule_warns():
    import warnings

    import pytest

    from horizon.quant.assign import linear_paths
    from horizon.quant.recipe import KeepRule, QuantRecipe, check_rules, get_recipe

    cfg = _cfg("nvfp4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LM(cfg, rngs=nnx.Rngs(0))  # every preset rule matches something: no warning
    dead = QuantRecipe(name="x", linear=get_recipe("nvfp4").linear, keep=(KeepRule(paths=("*router*",)),))
    with pytest.warns(UserWarning, match="router"):
        check_rules(dead, linear_paths(cfg), n_layers=cfg.n_layers)
