"""Recipes: the presets say what the paper says, layer rules resolve as documented, bad names and
dead rules are reported."""

import dataclasses
import warnings

import pytest

from horizon.errors import ConfigError
from horizon.quant import (
    PRESETS,
    GemmQuant,
    KeepRule,
    LinearRecipe,
    OperandQuant,
    QuantRecipe,
    check_rules,
    get_recipe,
    resolve,
)


def _ops(lin: LinearRecipe):
    return {
        "fprop.x": lin.fprop.lhs,
        "fprop.w": lin.fprop.rhs,
        "dgrad.dy": lin.dgrad.lhs,
        "dgrad.w": lin.dgrad.rhs,
        "wgrad.dy": lin.wgrad.lhs,
        "wgrad.x": lin.wgrad.rhs,
    }


def test_nvfp4_preset_is_the_papers_recipe():
    ops = _ops(get_recipe("nvfp4").linear)
    assert all(op.fmt == "nvfp4" for op in ops.values())
    for name in ("fprop.w", "dgrad.w"):
        assert ops[name].block == (16, 16) and ops[name].rounding == "rne", name
    for name in ("fprop.x", "wgrad.x"):
        assert ops[name].block == (1, 16) and ops[name].rounding == "rne", name
    for name in ("dgrad.dy", "wgrad.dy"):
        assert ops[name].block == (1, 16) and ops[name].rounding == "stochastic", name
    assert {n for n, op in ops.items() if op.hadamard} == {"wgrad.dy", "wgrad.x"}


def test_nvfp4_keeps_first_block_last_15_percent_and_heads_in_high_precision():
    r = get_recipe("nvfp4")
    kept = [
        i
        for i in range(20)
        if resolve(r, layer_index=i, n_layers=20, path=f"blocks/{i}/mlp/up") is None
    ]
    assert kept == [0, 17, 18, 19]  # round(0.15 * 20) = 3 last blocks
    assert resolve(r, layer_index=None, n_layers=20, path="lm_head") is None
    assert resolve(r, layer_index=5, n_layers=20, path="blocks/5/attn/q_proj") == r.linear


@pytest.mark.parametrize(
    "name, changed",
    [
        ("nvfp4_no_rht", {"wgrad.dy": {"hadamard": False}, "wgrad.x": {"hadamard": False}}),
        ("nvfp4_no_sr", {"dgrad.dy": {"rounding": "rne"}, "wgrad.dy": {"rounding": "rne"}}),
        ("nvfp4_1d_weights", {"fprop.w": {"block": (1, 16)}, "dgrad.w": {"block": (1, 16)}}),
    ],
)
def test_ablations_differ_from_nvfp4_in_exactly_their_aspect(name, changed):
    base, abl = _ops(get_recipe("nvfp4").linear), _ops(get_recipe(name).linear)
    for op_name, op in base.items():
        want = dataclasses.replace(op, **changed.get(op_name, {}))
        assert abl[op_name] == want, (name, op_name)
    assert get_recipe(name).keep == get_recipe("nvfp4").keep


def test_all_layers_ablation_quantizes_every_block():
    r = get_recipe("nvfp4_all_layers")
    assert all(
        resolve(r, layer_index=i, n_layers=8, path=f"blocks/{i}/mlp") == r.linear for i in range(8)
    )
    assert resolve(r, layer_index=None, n_layers=8, path="lm_head") is None


def test_baseline_presets():
    assert resolve(get_recipe("bf16"), layer_index=3, n_layers=8, path="blocks/3/mlp") is None
    for name, fmt, block in (
        ("fp8", "fp8", None),
        ("mxfp8", "mxfp8", (1, 32)),
        ("mxfp4", "mxfp4", (1, 32)),
    ):
        lin = get_recipe(name).linear
        assert lin.fprop.lhs.fmt == fmt and lin.fprop.lhs.block == block, name
    assert set(PRESETS) >= {
        "bf16",
        "fp8",
        "mxfp8",
        "mxfp4",
        "nvfp4",
        "nvfp4_no_rht",
        "nvfp4_no_sr",
        "nvfp4_1d_weights",
        "nvfp4_all_layers",
    }


def test_unknown_recipe_lists_the_presets():
    with pytest.raises(
        ConfigError, match=r"unknown quant recipe 'nvfp5'; presets: bf16, .*nvfp4_all_layers"
    ):
        get_recipe("nvfp5")


def test_high_precision_switch_moves_fprop_late_in_training():
    r = dataclasses.replace(get_recipe("nvfp4_all_layers"), high_precision_from=0.8)
    early = resolve(r, layer_index=2, n_layers=4, path="blocks/2/mlp", step=79, total_steps=100)
    late = resolve(r, layer_index=2, n_layers=4, path="blocks/2/mlp", step=80, total_steps=100)
    assert early == r.linear
    assert (
        late.fprop == GemmQuant() and late.dgrad == r.linear.dgrad and late.wgrad == r.linear.wgrad
    )
    r_all = dataclasses.replace(r, high_precision_scope="all")
    assert (
        resolve(r_all, layer_index=2, n_layers=4, path="blocks/2/mlp", step=90, total_steps=100)
        is None
    )
    with pytest.raises(ConfigError, match="total_steps"):
        resolve(r, layer_index=2, n_layers=4, path="blocks/2/mlp", step=90)


def test_check_rules_warns_naming_a_rule_that_matches_no_layer():
    r = QuantRecipe(
        name="mine",
        linear=get_recipe("nvfp4").linear,
        keep=(KeepRule(paths=("*router*",)), KeepRule(layers=(0, 1)), KeepRule(last_fraction=0.15)),
    )
    paths = [f"blocks/{i}/{m}" for i in range(2) for m in ("attn/qkv", "mlp/up")]
    with pytest.warns(UserWarning) as record:
        msgs = check_rules(r, paths)
    text = [str(w.message) for w in record]
    assert len(msgs) == 2 and text == msgs
    assert any("KeepRule(paths=('*router*',))" in m for m in msgs)
    assert any("KeepRule(last_fraction=0.15)" in m and "n_layers=2" in m for m in msgs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_rules(r, [*paths, "blocks/2/router", "blocks/19/mlp/up"]) == []


def test_invalid_recipe_pieces_raise_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        KeepRule(paths=("*",), layers=(0, 1))
    with pytest.raises(ConfigError, match="hadamard"):
        GemmQuant(lhs=OperandQuant(fmt="nvfp4", hadamard=True), rhs=OperandQuant(fmt="nvfp4"))
    with pytest.raises(ConfigError, match="nvfp4"):
        OperandQuant(fmt="fp4")
    with pytest.raises(ConfigError, match="high_precision_scope"):
        QuantRecipe(high_precision_scope="dgrad")
    with pytest.raises(ConfigError, match="tuple of patterns"):
        KeepRule(paths="*head*")
