"""kernels.qmatmul.gemv_f16, the decode="f16x2" weight-only NVFP4 GEMV (interpret mode): the
word decoder against qtensor's decoder on every code, x's move to f16 against its definition,
and the product against the dequantize-then-dot reference (ragged N and K, split-K, 1x16 and
16x16 scales, rows spanning 60 binades), plus its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horizon.quant import formats
from kernels.errors import KernelInputError
from kernels.qmatmul import MatmulConfig, pack, qmatmul
from kernels.qmatmul import gemv_f16 as g
from kernels.qmatmul.qtensor import decode, pack_e2m1
from kernels.qmatmul.reference import qmatmul_reference
from kernels.testing import assert_allclose

_quantize = jax.jit(formats.quantize, static_argnames=("fmt", "block"))


def test_word_decoder_gives_every_code_times_2_to_the_minus_14():
    # Row r holds codes (r + i) % 16 at nibble i: every code at every position.
    codes = (np.arange(16)[:, None] + np.arange(8)[None, :]) % 16
    words = g.word_view(pack_e2m1(jnp.asarray(codes, jnp.uint8)))  # [16, 1] uint32
    want = np.asarray(decode(jnp.asarray(codes, jnp.uint8), "e2m1"), np.float32) * 2.0**-14
    for j in range(4):
        bits = np.asarray(g.f16_pair_bits(words, j))[:, 0]
        for i, half in ((j, bits & 0xFFFF), (j + 4, bits >> 16)):
            got = half.astype(np.uint16).view(np.float16).astype(np.float32)
            np.testing.assert_array_equal(got, want[:, i], err_msg=f"nibble {i}")
            # The sign of zero survives too (-0.0 is code 8).
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want[:, i]))


def test_every_scaled_element_is_exact_in_f16():
    """e2m1 * 2^-14 * scale for all 16 codes x all finite E4M3 scales equals the exact product."""
    codes = jnp.arange(16, dtype=jnp.uint8).reshape(2, 8)  # two words: codes 0-7 and 8-15
    words = g.word_view(pack_e2m1(codes))[:, 0]  # [2]
    scales = jnp.arange(256, dtype=jnp.uint8)
    s2 = jnp.broadcast_to(g.scale_pair_bits(scales)[:, None], (256, 2))
    e2m1 = np.asarray(decode(codes, "e2m1"), np.float64)  # [2, 8]
    sc = np.asarray(decode(scales, "e4m3"), np.float64)
    finite = np.isfinite(sc)  # 0x7F and 0xFF are NaN
    for j in range(4):
        pair = jnp.broadcast_to(g.f16_pair_bits(words, j)[None, :], (256, 2))
        for i, half in zip((j, j + 4), g.scaled_halves(pair, s2, interpret=True)):
            want = sc[:, None] * e2m1[None, :, i] * 2.0**-14  # float64: exact
            got = np.asarray(half, np.float64)
            np.testing.assert_array_equal(got[finite], want[finite], err_msg=f"nibble {i}")


def test_x_moves_to_f16_exactly_with_a_row_power_of_two():
    x = jax.random.normal(jax.random.key(0), (4, 256)).astype(jnp.bfloat16)
    x = x * jnp.asarray([1e-30, 1.0, 3e4, 0.0], jnp.bfloat16)[:, None]
    e = g.row_exponents(x)
    x16 = g.to_f16_reordered(x, e, 128, 256)
    # Undo the reordering by the definition: column ((w*2 + jlow)*2 + jhigh)*2 + t of a chunk
    # holds element 8w + jlow + 2 jhigh + 4 t.
    perm = np.empty(128, np.int64)
    for w in range(16):
        for jl in range(2):
            for jh in range(2):
                for t in range(2):
                    perm[((w * 2 + jl) * 2 + jh) * 2 + t] = 8 * w + jl + 2 * jh + 4 * t
    back = np.asarray(x16, np.float32).reshape(4, 2, 128)
    orig = np.empty_like(back)
    orig[:, :, perm] = back
    scaled = np.asarray(x, np.float32) * np.exp2(-np.asarray(e, np.float64))[:, None]
    np.testing.assert_array_equal(orig.reshape(4, 256), scaled.astype(np.float32))
    amax = np.abs(orig.reshape(4, 256)).max(axis=1)
    assert np.all((amax[:3] >= 2.0**14) & (amax[:3] < 2.0**15)) and amax[3] == 0


@pytest.mark.parametrize(
    "m,n,k,block,cfg",
    [
        (1, 72, 256, (1, 16), MatmulConfig(block_m=16, block_n=32, block_k=128, decode="f16x2")),
        # Ragged N and K, and split-K 2 over 3 K steps: the last program reads only padding.
        (
            5,
            64,
            400,
            (16, 16),
            MatmulConfig(block_m=16, block_n=32, block_k=128, split_k=2, decode="f16x2"),
        ),
        (16, 40, 160, (1, 16), MatmulConfig(block_m=16, block_n=16, block_k=256, decode="f16x2")),
    ],
)
def test_f16x2_gemv_matches_reference(m, n, k, block, cfg):
    kx, kw = jax.random.split(jax.random.key(m))
    x = jax.random.normal(kx, (m, k)) * jnp.exp(3 * jax.random.normal(kw, (m, k)))
    x = x.astype(jnp.bfloat16).at[0, 3].set(3e4)
    if m > 2:
        x = x.at[1].set(0).at[2].multiply(1e-25)  # a zero row and a tiny one
    w = jax.random.normal(kw, (-(-n // 16) * 16, k))
    q = _quantize(w, "nvfp4", block=block)
    out = qmatmul(x, pack(q), interpret=True, config=cfg)
    ref = qmatmul_reference(x, q)
    # Relative to each row's scale: rows differ by up to 60 binades.
    row_scale = np.abs(np.asarray(ref)).max(axis=1, keepdims=True) + 1e-37
    assert_allclose(
        np.asarray(out) / row_scale,
        np.asarray(ref) / row_scale,
        dtype=jnp.float32,
        contraction=k,
        scale=1.0,
    )


def test_f16x2_refuses_what_it_cannot_take():
    x = jnp.ones((2, 128), jnp.bfloat16)
    q = _quantize(jnp.ones((32, 128)), "nvfp4", block=(1, 16))
    cfg = MatmulConfig(block_m=16, block_n=32, block_k=128, decode="f16x2")
    with pytest.raises(KernelInputError, match="b must be a PackedQTensor in nvfp4"):
        qmatmul(x, q, interpret=True, config=cfg)
    with pytest.raises(KernelInputError, match="a must be a bf16/f16 array"):
        qmatmul(x.astype(jnp.float32), pack(q), interpret=True, config=cfg)
    with pytest.raises(KernelInputError, match="more than block_m=16"):
        qmatmul(jnp.ones((17, 128), jnp.bfloat16), pack(q), interpret=True, config=cfg)
    small_k = MatmulConfig(block_m=16, block_n=32, block_k=64, decode="f16x2")
    with pytest.raises(KernelInputError, match="block_k=64 must be a multiple of 128"):
        qmatmul(x, pack(q), interpret=True, config=small_k)
