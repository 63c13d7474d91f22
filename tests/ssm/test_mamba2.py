"""horizon.ssm.ssd.Mamba2: the recurrent decode step equals the parallel form, streaming prefill
equals one pass, segment ids reset conv and SSM state, initialisation ranges, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import SSM, Model
from horizon.errors import ConfigError, ShapeError
from horizon.ssm.ssd import Mamba2
from kernels.testing import assert_allclose

_CFG = Model(d_model=32, n_heads=4, n_layers=2,
             ssm=SSM(state_size=16, head_dim=8, n_groups=2, chunk=8, conv_width=4))


@pytest.fixture(scope="module")
def mixer():
    return Mamba2(_CFG, layer_index=0, rngs=nnx.Rngs(0))


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _split_call(mixer, fn):
    """jit over the split state, as training code does."""
    graphdef, state = nnx.split(mixer)
    return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a)), state


def test_recurrent_decode_step_equals_parallel_form(mixer):
    x = _x((2, 19, 32))
    call, state = _split_call(mixer, lambda m, x: m(x))
    y_par = call(state, x)

    step, _ = _split_call(mixer, lambda m, x, c: m.step(x, c))
    cache, ys = mixer.init_cache(2), []
    for t in range(19):
        y_t, cache = step(state, x[:, t], cache)
        ys.append(y_t)
    assert_allclose(jnp.stack(ys, axis=1), y_par, dtype=jnp.float32, contraction=19 * 16, scale=4)
    # The step's SSM state is the scan's final state.
    _, cache_par = _split_call(mixer, lambda m, x: m.prefill(x))[0](state, x)
    assert_allclose(cache.ssm, cache_par.ssm, dtype=jnp.float32, contraction=19 * 16)
    assert int(cache.length) == 19


def test_prefill_in_pieces_with_cache_then_step_equals_one_pass(mixer):
    x = _x((2, 21, 32), 1)
    seg = jnp.asarray([[0] * 12 + [1] * 9, [5] * 21], jnp.int32)
    call, state = _split_call(mixer, lambda m, x, seg: m(x, segment_ids_BT=seg))
    prefill, _ = _split_call(mixer, lambda m, x, seg, c: m.prefill(x, segment_ids_BT=seg, cache=c))
    step, _ = _split_call(mixer, lambda m, x, c: m.step(x, c))
    y_full = call(state, x, seg)
    y1, cache = prefill(state, x[:, :10], seg[:, :10], mixer.init_cache(2))
    y2, cache = prefill(state, x[:, 10:20], seg[:, 10:20], cache)
    assert_allclose(jnp.concatenate([y1, y2], axis=1), y_full[:, :20], dtype=jnp.float32,
                    contraction=21 * 16)
    # Then decode the 21st token from the prefilled cache.
    y_step, _ = step(state, x[:, 20], cache)
    assert_allclose(y_step, y_full[:, 20], dtype=jnp.float32, contraction=21 * 16, scale=4)


def test_segment_ids_reset_conv_and_ssm_state(mixer):
    # A packed row of three documents gives, on each document, the output of that document alone.
    x = _x((1, 24, 32), 3)
    seg = jnp.asarray([[1] * 8 + [2] * 8 + [1] * 8], jnp.int32)
    call, state = _split_call(mixer, lambda m, x, seg: m(x, segment_ids_BT=seg))
    y = call(state, x, seg)
    for lo in (0, 8, 16):
        alone = call(state, x[:, lo:lo + 8], jnp.zeros((1, 8), jnp.int32))
        assert_allclose(y[:, lo:lo + 8], alone, dtype=jnp.float32, contraction=24 * 16)
    # With one id throughout, the later documents do see the earlier ones.
    assert not np.allclose(call(state, x, jnp.zeros_like(seg))[:, 8:16], y[:, 8:16], atol=1e-4)


def test_initialisation_ranges_follow_mamba2(mixer):
    A = np.asarray(mixer.A_H())
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert np.all((A <= -1.0) & (A >= -16.0)), A
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)), dt
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)


def test_bfloat16_compute_stays_close_to_float32():
    cfg16 = Model(d_model=32, n_heads=4, compute_dtype="bfloat16",
                  ssm=SSM(state_size=16, head_dim=8, n_groups=1, chunk=8))
    cfg32 = Model(d_model=32, n_heads=4, ssm=cfg16.ssm)
    x = _x((1, 16, 32), 4)
    y16, y32 = (nnx.jit(lambda m, x: m(x))(Mamba2(c, layer_index=0, rngs=nnx.Rngs(4)), x)
                for c in (cfg16, cfg32))
    scale = float(jnp.max(jnp.abs(y32)))
    assert_allclose(y16 / scale, y32 / scale, dtype=jnp.bfloat16, contraction=64)


@pytest.mark.parametrize("ssm,needle", [
    (SSM(head_dim=24), "model.ssm.head_dim"),  # 24 does not divide 2 * 32
    (SSM(head_dim=8, n_groups=3), "model.ssm.n_groups"),  # 3 does not divide 8 heads
])
def test_sizes_that_do_not_fit_raise_config_error(ssm, needle):
    with pytest.raises(ConfigError, match=needle):
        Mamba2(Model(d_model=32, n_heads=4, ssm=ssm), layer_index=0, rngs=nnx.Rngs(0))


def test_wrong_input_width_raises_shape_error(mixer):
    with pytest.raises(ShapeError, match="d_model=32"):
        mixer(jnp.zeros((1, 4, 16)))
    with pytest.raises(ShapeError, match="segment_ids"):
        mixer(jnp.zeros((1, 4, 32)), segment_ids_BT=jnp.zeros((1, 5), jnp.int32))
