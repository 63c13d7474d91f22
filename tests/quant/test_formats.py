"""quantize/dequantize against independent numpy specifications, bit for bit."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon.errors import ConfigError, ShapeError
from horizon.quant import NonFiniteError, dequantize, nonfinite_count, quantize
from kernels.qmatmul import pack_e2m1, unpack_e2m1
from tests.quant import _reference as ref


def _heavy_tailed(seed, shape, scale):
    """Normal values times a log-uniform per-row scale: blocks of very different magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, (shape[0], 1))) * scale
    x[rng.random(shape) < 0.05] = 0.0
    return x.astype(np.float32)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.sampled_from([16, 32]),
    cols=st.sampled_from([16, 48, 64]),
    two_d=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_nvfp4_matches_numpy_spec_bit_for_bit(seed, rows, cols, two_d, scale):
    x = _heavy_tailed(seed, (rows, cols), scale)
    block = (16, 16) if two_d else (1, 16)
    q = quantize(jnp.asarray(x), "nvfp4", block=block)
    codes, scales, s = ref.nvfp4(x, block)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    assert np.float32(q.tensor_scale) == s
    assert q.block_shape == block


def test_nvfp4_rounding_ties_go_to_even_codes():
    # amax 7.875 makes s = 3 * 2**-10 and the block scale 448 exactly, so the element divisor is
    # d = 21/16 (not a power of two): midpoints * d divide back to exact E2M1 midpoints, which
    # must round to the even code.
    d = 21 / 16
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    x = np.concatenate([[7.875], mids * d, -mids * d, [-0.1]]).astype(np.float32)[None]
    q = quantize(jnp.asarray(x), "nvfp4")
    assert float(q.tensor_scale) == 3 * 2**-10 and np.asarray(q.scale_values())[0, 0] == 448.0
    got = np.asarray(q.element_values())[0]
    want = np.array([6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -1, -2, -2, -4, -4, -0.0], np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(q.codes)[0], ref.e2m1_code(want))


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    fmt=st.sampled_from(["mxfp4", "mxfp8", "mxfp8_e5m2"]),
    two_d=st.booleans(),
)
def test_mx_formats_match_ocp_spec_bit_for_bit(seed, fmt, two_d):
    x = _heavy_tailed(seed, (32, 64), 1.0)
    block = (32, 32) if two_d else (1, 32)
    elem = {"mxfp4": "e2m1", "mxfp8": "e4m3", "mxfp8_e5m2": "e5m2"}[fmt]
    q = quantize(jnp.asarray(x), fmt, block=block)
    codes, scales = ref.mx(x, elem, block)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    assert float(q.tensor_scale) == 1.0


def test_mx_elements_saturate_at_format_max():
    # amax = 7.9: shared exp = floor(log2 7.9) - 2 = 0, so 7.9 -> clipped to 6 (OCP saturating).
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = 7.9, -7.0
    d = np.asarray(dequantize(quantize(jnp.asarray(x), "mxfp4")))
    assert d[0, 0] == 6.0 and d[0, 1] == -6.0


def test_fp8_per_tensor_scale_matches_spec():
    x = _heavy_tailed(3, (16, 32), 10.0)
    q = quantize(jnp.asarray(x), "fp8")
    codes, s = ref.fp8(x)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    assert np.float32(q.tensor_scale) == s
    np.testing.assert_array_equal(np.asarray(q.scale_values()), np.ones((1, 1), np.float32))


def test_scale_rounding_is_e4m3_rne_like_ml_dtypes():
    # XLA's float32 -> e4m3 conversion must round to nearest even, like the spec (all midpoints).
    vals = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)
    probe = np.concatenate([vals, mids, np.nextafter(mids, 0), np.nextafter(mids, 1000)]).astype(
        np.float32
    )
    got = np.asarray(
        jax.lax.bitcast_convert_type(jnp.asarray(probe).astype(jnp.float8_e4m3fn), jnp.uint8)
    )
    np.testing.assert_array_equal(got, ref.f8_bits(probe, ml_dtypes.float8_e4m3fn))


def test_2d_blocks_transpose_exactly():
    x = jnp.asarray(_heavy_tailed(5, (32, 48), 1.0))
    q, qt = quantize(x, "nvfp4", block=(16, 16)), quantize(x.T, "nvfp4", block=(16, 16))
    np.testing.assert_array_equal(np.asarray(q.T.codes), np.asarray(qt.codes))
    np.testing.assert_array_equal(np.asarray(q.T.scales), np.asarray(qt.scales))
    np.testing.assert_array_equal(np.asarray(dequantize(q)).T, np.asarray(dequantize(qt)))


def test_axis_zero_blocks_equal_transposed_last_axis_blocks():
    x = jnp.asarray(_heavy_tailed(6, (32, 16), 1.0))
    q0 = quantize(x, "nvfp4", axis=0)
    assert q0.block_shape == (16, 1)
    np.testing.assert_array_equal(np.asarray(q0.T.codes), np.asarray(quantize(x.T, "nvfp4").codes))
    np.testing.assert_array_equal(
        np.asarray(q0.T.scales), np.asarray(quantize(x.T, "nvfp4").scales)
    )


def test_stochastic_draws_follow_the_quantization_axis_not_the_memory_layout():
    x = jnp.asarray(_heavy_tailed(11, (32, 48), 1.0))
    key = jax.random.key(4)
    for block in ((1, 16), (16, 16)):
        q0 = quantize(x, "nvfp4", axis=0, block=block, rounding="stochastic", key=key)
        qt = quantize(x.T, "nvfp4", block=block, rounding="stochastic", key=key)
        np.testing.assert_array_equal(np.asarray(q0.T.codes), np.asarray(qt.codes))
        np.testing.assert_array_equal(np.asarray(q0.T.scales), np.asarray(qt.scales))


def test_higher_rank_blocks_follow_axis():
    x = _heavy_tailed(7, (6, 32), 1.0).reshape(2, 3, 32)
    q = quantize(jnp.asarray(x), "nvfp4")
    assert q.block_shape == (1, 1, 16) and q.scales.shape == (2, 3, 2)
    np.testing.assert_array_equal(
        np.asarray(q.codes).reshape(6, 32), ref.nvfp4(x.reshape(6, 32), (1, 16))[0]
    )


def test_all_zero_input_gives_zeros_and_unit_tensor_scale():
    for fmt in ("nvfp4", "mxfp4", "mxfp8", "fp8"):
        q = quantize(jnp.zeros((2, 64)), fmt)
        assert float(q.tensor_scale) == 1.0, fmt
        np.testing.assert_array_equal(np.asarray(dequantize(q)), np.zeros((2, 64), np.float32))


def test_zero_block_in_nonzero_tensor_is_zero():
    x = np.zeros((1, 32), np.float32)
    x[0, 20] = 3.0
    d = np.asarray(dequantize(quantize(jnp.asarray(x), "nvfp4")))
    np.testing.assert_array_equal(d[0, :16], 0.0)
    assert abs(d[0, 20] - 3.0) < 1e-5


def test_nonfinite_input_raises_eagerly():
    x = jnp.ones((2, 16)).at[1, 3].set(jnp.nan)
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        quantize(x, "nvfp4")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp8"])
def test_nonfinite_input_under_jit_is_loud_and_counted(fmt):
    x = jnp.ones((2, 32)).at[0, 5].set(jnp.inf).at[1, 0].set(jnp.nan)
    out = jax.jit(lambda x: dequantize(quantize(x, fmt)))(x)
    assert np.isnan(np.asarray(out)).all()  # every value NaN, not a silently clipped number
    assert int(jax.jit(nonfinite_count)(x)) == 2


def test_non_multiple_of_block_raises_naming_shape_and_block():
    with pytest.raises(ShapeError, match=r"x.shape\[1\]=20 .*\(3, 20\).*block size 16"):
        quantize(jnp.ones((3, 20)), "nvfp4")
    with pytest.raises(ShapeError, match=r"x.shape\[0\]=8.*block size 16"):
        quantize(jnp.ones((8, 32)), "nvfp4", block=(16, 16))


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="nvfp4"):
        quantize(jnp.ones((1, 16)), "int4")
    with pytest.raises(ConfigError, match="key"):
        quantize(jnp.ones((1, 16)), "nvfp4", rounding="stochastic")


def test_pack_unpack_round_trip_is_exact_on_all_codes():
    x = jnp.asarray(_heavy_tailed(8, (16, 64), 1.0))
    codes = quantize(x, "nvfp4").codes
    packed = pack_e2m1(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (16, 32)
    np.testing.assert_array_equal(np.asarray(unpack_e2m1(packed)), np.asarray(codes))
    every = jnp.arange(256, dtype=jnp.uint8)[None]  # every pair of nibbles
    np.testing.assert_array_equal(np.asarray(pack_e2m1(unpack_e2m1(every))), np.asarray(every))


def test_dequantize_equals_elements_times_scales_spec():
    x = _heavy_tailed(9, (16, 32), 1.0)
    q = quantize(jnp.asarray(x), "nvfp4")
    codes, scales, s = ref.nvfp4(x, (1, 16))
    want = (
        ref.e2m1_value(codes)
        * np.repeat(scales.view(ml_dtypes.float8_e4m3fn).astype(np.float32), 16, 1)
        * s
    )
    np.testing.assert_array_equal(np.asarray(dequantize(q)), want.astype(np.float32))


def test_stochastic_quantize_is_reproducible_for_a_key_and_varies_across_keys():
    x = jnp.asarray(_heavy_tailed(10, (16, 64), 1.0))
    a = quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(1))
    b = quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(1))
    c = quantize(x, "nvfp4", rounding="stochastic", key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert (np.asarray(a.codes) != np.asarray(c.codes)).any()
    # the block scales do not depend on the rounding of the elements
    np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(quantize(x, "nvfp4").scales))
