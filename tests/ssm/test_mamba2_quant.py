"""Mamba-2's input and output projections follow the model's quantization recipe under the paths
"layers/{i}/ssm/in" and "layers/{i}/ssm/out" (horizon.quant.assign): under NVFP4 they run through
horizon.quant.quantized_dot, and a keep-in-high-precision rule on "layers/*/ssm/*" makes the model
equal the bf16 model bit for bit."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import SSM, Model, Quant
from horizon.models.lm import LM
from horizon.quant import recipe as recipe_mod
from horizon.quant.recipe import HEAD_RULE, KeepRule, QuantRecipe, check_rules, get_recipe

NVFP4 = get_recipe("nvfp4").linear
SSM_RULE = KeepRule(paths=("layers/*/ssm/*",))
REST_RULE = KeepRule(paths=("layers/*/attn/*", "layers/*/mlp/*"))


@pytest.fixture
def presets(monkeypatch):
    """Test-only presets: only the SSM projections quantized, and everything kept high precision
    by path rules (attention and MLP by one rule, the SSM projections by another)."""
    monkeypatch.setitem(recipe_mod.PRESETS, "t_ssm_only",
                        QuantRecipe(name="t_ssm_only", linear=NVFP4, keep=(HEAD_RULE, REST_RULE)))
    monkeypatch.setitem(recipe_mod.PRESETS, "t_ssm_kept",
                        QuantRecipe(name="t_ssm_kept", linear=NVFP4, keep=(HEAD_RULE, REST_RULE, SSM_RULE)))
    monkeypatch.setitem(recipe_mod.PRESETS, "t_all_but_ssm",
                        QuantRecipe(name="t_all_but_ssm", linear=NVFP4, keep=(HEAD_RULE, SSM_RULE)))


def _cfg(recipe: str, pattern: str = "ssd,attn") -> Model:
    # inner 64, B/C width 16: the fused in-projection is [32, 160], every dim a multiple of 16.
    return Model(d_model=32, n_layers=2, n_heads=2, vocab_size=64, layer_pattern=pattern,
                 ssm=SSM(state_size=16, head_dim=32, chunk=8), quant=Quant(recipe=recipe))


TOKENS = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)


@nnx.jit
def _forward(model, tokens, key):
    return model(tokens, quant_key=key)


def _logits(model):
    return np.asarray(_forward(model, TOKENS, jax.random.PRNGKey(3)))


def test_paths_and_gemm_ids_cover_the_ssm_projections():
    from horizon.quant import assign

    cfg = _cfg("nvfp4_all_layers")
    paths = assign.linear_paths(cfg)
    assert [p for p in paths if "/ssm/" in p] == ["layers/0/ssm/in", "layers/0/ssm/out"]
    assert not any(p.startswith("layers/1/ssm") for p in paths)  # layer 1 is attention
    with warnings.catch_warnings():  # the SSM rule matches the hybrid: no warning
        warnings.simplefilter("error")
        check_rules(QuantRecipe(linear=NVFP4, keep=(SSM_RULE,)), paths, n_layers=2)
    with pytest.warns(UserWarning, match="ssm"):  # and nothing in an all-attention model
        check_rules(QuantRecipe(linear=NVFP4, keep=(SSM_RULE,)), assign.linear_paths(_cfg("bf16", "attn")),
                    n_layers=2)
    model = LM(cfg, rngs=nnx.Rngs(0))
    mixer, attn = model.layers[0].mixer, model.layers[1].mixer
    assert mixer.in_recipe == NVFP4 and mixer.out_recipe == NVFP4
    ids = [mixer.in_gemm_id, mixer.out_gemm_id, *(getattr(attn, n).gemm_id for n in "qkvo")]
    ids += [getattr(b.mlp, n).gemm_id for b in model.layers for n in ("gate", "up", "down")]
    assert len(set(ids)) == len(ids), ids


def test_nvfp4_ssm_projections_go_through_quantized_dot(presets, monkeypatch):
    from horizon.quant import dot

    calls = []
    real = dot.quantized_dot

    def spy(x, w_KN, recipe, key=None):
        calls.append(tuple(w_KN.shape))
        return real(x, w_KN, recipe, key)

    monkeypatch.setattr(dot, "quantized_dot", spy)
    _logits(LM(_cfg("t_ssm_only"), rngs=nnx.Rngs(0)))
    # Only the SSM is quantized: the fused [z | x | B | C] projection and the output projection.
    assert sorted(calls) == sorted([(32, 2 * 64 + 2 * 16), (64, 32)])
    calls.clear()
    _logits(LM(_cfg("t_ssm_kept"), rngs=nnx.Rngs(0)))
    assert calls == []


def test_quantized_ssm_differs_from_bf16_and_the_keep_rule_restores_it_exactly(presets):
    bf16 = _logits(LM(_cfg("bf16"), rngs=nnx.Rngs(0)))
    quant = _logits(LM(_cfg("t_ssm_only"), rngs=nnx.Rngs(0)))
    kept = _logits(LM(_cfg("t_ssm_kept"), rngs=nnx.Rngs(0)))
    assert not np.array_equal(quant, bf16)
    # A quantization error of the same computation (measured: 20% relative, correlation 0.98 at
    # this random init), not another function.
    assert np.linalg.norm(quant - bf16) < 0.35 * np.linalg.norm(bf16)
    assert np.corrcoef(quant.ravel(), bf16.ravel())[0, 1] > 0.9
    np.testing.assert_array_equal(kept, bf16)


def test_keep_rule_on_ssm_alone_leaves_the_mixer_equal_to_bf16(presets):
    """nvfp4 on attention and MLP, the SSM kept: its mixer output equals the bf16 mixer's exactly,
    while the fully quantized model's mixer differs."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 32))
    key = jax.random.PRNGKey(5)

    def mixer_out(recipe):
        mixer = LM(_cfg(recipe), rngs=nnx.Rngs(0)).layers[0].mixer
        return np.asarray(nnx.jit(lambda m, x, k: m(x, quant_key=k))(mixer, x, key))

    bf16 = mixer_out("bf16")
    np.testing.assert_array_equal(mixer_out("t_all_but_ssm"), bf16)
    assert not np.array_equal(mixer_out("nvfp4_all_layers"), bf16)


def test_quantized_mixer_gradients_are_finite_and_nonzero(presets):
    mixer = LM(_cfg("t_ssm_only"), rngs=nnx.Rngs(0)).layers[0].mixer
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 32))  # 32 tokens: wgrad blocks of 16

    def loss(m):
        return jnp.mean(m(x, quant_key=jax.random.PRNGKey(3)) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(mixer)
    g = nnx.to_pure_dict(grads)
    assert np.isfinite(float(value))
    for name in ("w_z", "w_x", "w_B", "w_C", "w_out"):
        assert np.all(np.isfinite(np.asarray(g[name]))) and np.any(np.asarray(g[name]) != 0), name
