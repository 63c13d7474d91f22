"""kernels.qmatmul's fused quantize kernel (interpret mode) and its in-kernel codecs against the
spec, horizon/quant/formats.py, bit for bit: every format, 1-D and 2-D blocks, both rounding modes
with the same key, the random Hadamard transform, E2M1 packing, and the edges (zero blocks, a
block holding one huge value, tiles that overhang the array)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.quant import formats, hadamard
from horizon.quant import rounding as spec_rounding
from kernels.errors import KernelInputError
from kernels.qmatmul import QuantizeConfig, codecs, pack, quantize
from kernels.qmatmul import quantize_pallas as qp
from kernels.qmatmul.qtensor import decode


def _x(shape, seed=0):
    """Heavy-tailed data with the edge cases planted: an all-zero block, one huge value, tiny
    values (codes that round to signed zero), exact ties of the E2M1 grid."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape) * jnp.exp(1.5 * jax.random.normal(k2, shape))
    x = x.reshape(-1, shape[-1])
    x = x.at[:16, :32].set(0.0)  # zero blocks (1x16, 16x16 and 1x32 alike)
    x = x.at[20, 40].set(3.0e4)  # one huge value: its block's other elements flush to zero
    x = x.at[21, :16].set(jnp.array([-1e-7, 1e-7, -0.0, 2.5, -1.25, 0.75, 0.25, -5.0] * 2))
    return x.reshape(shape)


def _assert_same(q, r):
    assert q.fmt == r.fmt and q.block_shape == r.block_shape
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(q.scales), np.asarray(r.scales))
    np.testing.assert_array_equal(np.asarray(q.tensor_scale), np.asarray(r.tensor_scale))


# Small kernel tiles so a (48, 96) or (64, 96) array leaves ragged row and column tiles.
_TILES = QuantizeConfig(block_rows=32, block_cols=64)

CASES = [
    # fmt, block, shape, axis, rounding
    ("nvfp4", (1, 16), (48, 96), -1, "rne"),
    ("nvfp4", (16, 16), (48, 96), -1, "rne"),
    ("nvfp4", (16, 16), (48, 96), 0, "stochastic"),
    ("nvfp4", (1, 16), (2, 48, 32), 1, "rne"),  # bf16, axis in the middle of a rank-3 tensor
    ("mxfp4", (1, 32), (48, 96), -1, "rne"),
    ("mxfp4", (1, 32), (64, 96), 0, "stochastic"),
    ("mxfp8", (1, 32), (48, 96), -1, "rne"),
    ("mxfp8_e5m2", (1, 32), (48, 96), -1, "stochastic"),
    ("fp8", None, (48, 96), 0, "stochastic"),
]


_VARIANTS = {
    "int_fp8": {"hw_fp8": False},
    "hw_fp8": {"hw_fp8": True},
    "fast_div": {"hw_fp8": True, "fast_div": True},
}


# fast_div only changes the NVFP4 and FP8 element divisions (MX formats multiply by 2^-e).
_CASES_BY_VARIANT = [
    (*case, variant)
    for case in CASES
    for variant in _VARIANTS
    if variant != "fast_div" or case[0] in ("nvfp4", "fp8")
]


@pytest.mark.parametrize("fmt,block,shape,axis,rounding,variant", _CASES_BY_VARIANT)
def test_quantize_kernel_is_bit_exact_with_formats(fmt, block, shape, axis, rounding, variant):
    x = _x(shape)
    if len(shape) == 3:
        x = x.astype(jnp.bfloat16)  # the kernel reads bf16 and widens in registers, as formats does
    key = jax.random.key(5)
    cfg = QuantizeConfig(block_rows=32, block_cols=64, **_VARIANTS[variant])
    q = quantize(
        x, fmt, block=block, axis=axis, rounding=rounding, key=key, config=cfg, interpret=True
    )
    r = jax.jit(formats.quantize, static_argnames=("fmt", "block", "axis", "rounding"))(
        x, fmt, block=block, axis=axis, rounding=rounding, key=key
    )
    _assert_same(q, r)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("magnitude", [1e-38, 1e-30, 1.0, 1e30, 3e37])
def test_fast_division_rescaling_keeps_tiny_and_huge_tensors_bit_exact(magnitude, fmt):
    """fast_div multiplies x and the block denominators by 2^-floor(log2 ts): exact, so tensors
    whose tensor scale is subnormal (1e-38) or huge quantize exactly as the spec does."""
    x = _x((32, 64), seed=4) * jnp.float32(magnitude / 3e4)
    cfg = QuantizeConfig(block_rows=32, block_cols=64, hw_fp8=True, fast_div=True)
    for rounding in ("rne", "stochastic"):
        key = jax.random.key(7)
        q = quantize(x, fmt, rounding=rounding, key=key, config=cfg, interpret=True)
        _assert_same(q, formats.quantize(x, fmt, rounding=rounding, key=key))


def test_all_zero_tensor_gives_zero_codes_and_unit_tensor_scale():
    x = jnp.zeros((16, 64), jnp.float32)
    q = quantize(x, "nvfp4", interpret=True)
    _assert_same(q, formats.quantize(x, "nvfp4"))
    assert float(q.tensor_scale) == 1.0 and not np.any(np.asarray(q.codes) & 7)


def test_rht_kernel_equals_formats_of_butterfly_transform():
    x = _x((32, 64))
    key = jax.random.key(2)
    q = quantize(x, "nvfp4", rounding="stochastic", key=key, rht_seed=3, interpret=True)
    r = formats.quantize(
        qp.rht_last_axis(x, qp._sign_mask(3)), "nvfp4", rounding="stochastic", key=key
    )
    _assert_same(q, r)


def test_butterfly_rht_is_the_hadamard_modules_transform():
    """Same matrix (signs from the same seed) and the same values up to fp32 summation order:
    horizon.quant.hadamard.rht sums with a matmul, the kernel with a fixed butterfly."""
    for seed in range(4):
        np.testing.assert_array_equal(
            qp.rht_signs(seed) * 0.25, hadamard.hadamard_matrix(seed)[:, 0]
        )
    x = jax.random.normal(jax.random.key(0), (8, 64))
    got = qp.rht_last_axis(x, qp._sign_mask(1))
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(hadamard.rht(x, axis=-1, seed=1)), rtol=0, atol=2e-6
    )


def test_packed_output_is_pack_of_the_spec():
    x = _x((48, 96))
    p = quantize(x, "nvfp4", block=(16, 16), packed=True, config=_TILES, interpret=True)
    r = pack(formats.quantize(x, "nvfp4", block=(16, 16)))
    np.testing.assert_array_equal(np.asarray(p.packed), np.asarray(r.packed))
    np.testing.assert_array_equal(np.asarray(p.scales), np.asarray(r.scales))


def test_in_kernel_decoders_match_qtensor_on_every_code():
    codes = jnp.arange(256, dtype=jnp.uint8)
    for fmt in ("e4m3", "e5m2", "e8m0"):
        got = np.asarray(jax.jit(codecs.DECODE[fmt])(codes)).view(np.uint32)
        want = np.asarray(decode(codes, fmt)).view(np.uint32)
        # E8M0 code 0 is 2**-127, a subnormal the CPU backend flushes to zero in qtensor.decode.
        start = 1 if fmt == "e8m0" else 0
        np.testing.assert_array_equal(got[start:], want[start:], err_msg=fmt)
    got = np.asarray(codecs.decode_e2m1(codes[:16])).view(np.uint32)
    np.testing.assert_array_equal(got, np.asarray(decode(codes[:16], "e2m1")).view(np.uint32))


def _grid_values():
    """All multiples of 1/64 in [-8, 8] (every E2M1 tie and midpoint), random values over many
    binades, fp8 subnormals and their ties, signed zeros, infinities and NaN."""
    fine = np.arange(-512, 513, dtype=np.float32) / 64
    rnd = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * np.float32(
        2.0
    ) ** np.random.default_rng(1).integers(-20, 12, 4096)
    sub = np.arange(-64, 65, dtype=np.float32) * np.float32(2.0**-11)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30], np.float32)
    return jnp.asarray(np.concatenate([fine, rnd, sub, special]))


@pytest.mark.parametrize("elem", ["e2m1", "e4m3", "e5m2"])
def test_in_kernel_rounding_and_encoding_match_spec(elem):
    v = _grid_values()
    u = spec_rounding.uniform(jax.random.key(3), v.shape)

    @jax.jit
    def both(v, u):
        out = {}
        for rounding in ("rne", "stochastic"):
            want_v = spec_rounding.round_to_grid(v, elem, rounding, u)
            got_v = codecs.round_to_grid(v, elem, rounding, u)
            out[rounding] = (
                want_v,
                got_v,
                formats.encode(want_v, elem),
                codecs.encode(got_v, elem),
            )
        if elem == "e2m1":
            out["fast"] = (codecs.e2m1_code_rne(v), codecs.e2m1_code_sr(v, u))
        return out

    out = jax.tree.map(np.asarray, both(v, u))
    for i, rounding in enumerate(("rne", "stochastic")):
        want_v, got_v, want_c, got_c = out[rounding]
        ok = ~np.isnan(
            want_v
        )  # NaN keeps its own payload rules; the codes of NaN are checked below
        np.testing.assert_array_equal(got_v.view(np.uint32)[ok], want_v.view(np.uint32)[ok])
        np.testing.assert_array_equal(got_c[ok], want_c[ok])
        if elem == "e2m1":
            np.testing.assert_array_equal(out["fast"][i], want_c)


def _ulp_neighbourhoods():
    """Every fp32 within 4 ulps of each E2M1 grid point and rounding midpoint (both signs), and
    all multiples of 2**-14 in [0, 8): where an integer/bit formulation of the rounding could
    go wrong by one ulp or at a binade edge."""
    points = np.array(
        [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8], np.float32
    )
    bits = points.view(np.int32)[:, None] + np.arange(-4, 5, dtype=np.int32)[None, :]
    near = bits.reshape(-1).view(np.float32)
    dense = np.arange(8 * 2**14, dtype=np.float32) / np.float32(2**14)
    v = np.concatenate([near, dense, np.float32(2.0**-126) * np.arange(4, dtype=np.float32)])
    return jnp.asarray(np.concatenate([v, -v]))


def test_e2m1_bit_codes_match_spec_next_to_every_tie():
    v = _ulp_neighbourhoods()
    u = spec_rounding.uniform(jax.random.key(4), v.shape)
    # Stochastic draws that sit exactly on the distance to the next point (u == frac) and just
    # below it: the `u < frac` comparison is strict in the spec.
    frac = v * 2.0 - jnp.floor(v * 2.0)
    u = u.at[::3].set(jnp.floor(frac[::3] * 2**24) / 2**24)

    @jax.jit
    def codes(v, u):
        return {
            "rne": (
                formats.encode(spec_rounding.round_to_grid(v, "e2m1", "rne"), "e2m1"),
                codecs.e2m1_code_rne(v),
            ),
            "sr": (
                formats.encode(spec_rounding.round_to_grid(v, "e2m1", "stochastic", u), "e2m1"),
                codecs.e2m1_code_sr(v, u),
            ),
        }

    for name, (want, got) in jax.tree.map(
        np.asarray, codes(v, u), is_leaf=lambda t: isinstance(t, tuple)
    ).items():
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("elem", ["e4m3", "e5m2"])
def test_fp8_hardware_conversion_path_matches_integer_path_and_spec(elem):
    v = _grid_values()
    ok = ~np.isnan(np.asarray(v))  # NaN's code is the tensor scale's business (it turns NaN)
    want = np.asarray(formats.encode(spec_rounding.round_to_grid(v, elem, "rne"), elem))
    for hw in (False, True):
        got = np.asarray(jax.jit(lambda v, hw=hw: codecs.fp8_code_rne(v, elem, hw=hw))(v))
        np.testing.assert_array_equal(got[ok], want[ok], err_msg=f"hw={hw}")
        back = np.asarray(codecs.decode_fp8(jnp.asarray(got), elem, hw=hw))
        np.testing.assert_array_equal(back[ok], np.asarray(decode(jnp.asarray(want), elem))[ok])


def test_in_kernel_uniform_draws_are_the_spec_draws():
    key = jax.random.key(9)
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    rows, cols = jnp.arange(6), jnp.arange(40)
    index = rows.astype(jnp.uint32)[:, None] * jnp.uint32(40) + cols.astype(jnp.uint32)[None, :]
    got = qp.uniform_tile((seeds[0], seeds[1]), index)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(spec_rounding.uniform(key, (6, 40))))


def test_bad_quantize_arguments_raise_kernel_input_errors():
    x = jnp.ones((16, 48))
    with pytest.raises(KernelInputError, match="fmt="):
        quantize(x, "int4", interpret=True)
    with pytest.raises(KernelInputError, match="multiple of the block size 32"):
        quantize(x, "mxfp4", interpret=True)
    with pytest.raises(KernelInputError, match="needs key="):
        quantize(x, "nvfp4", rounding="stochastic", interpret=True)
    with pytest.raises(KernelInputError, match="packed=True"):
        quantize(x, "mxfp8", block=(1, 16), packed=True, interpret=True)
