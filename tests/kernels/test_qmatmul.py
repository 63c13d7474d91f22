"""kernels.qmatmul.qmatmul: the Pallas block-scaled matmul (interpret mode) against the
dequantize-then-dot reference over hypothesis-drawn shapes and operand kinds (both quantized,
weight-only, packed E2M1, ragged tiles, split-K), dispatch and its record, the cuDNN operand
plumbing, bad input, and gradients through horizon.quant.quantized_dot."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizon.quant import dot as qdot
from horizon.quant import formats
from horizon.quant.recipe import get_recipe
from kernels.errors import KernelInputError
from kernels.qmatmul import MatmulConfig, QTensor, api, last_implementation, pack, qmatmul
from kernels.qmatmul.qtensor import dequantize
from kernels.qmatmul.reference import qmatmul_reference
from kernels.testing import assert_allclose

# Operand kinds: (format, block) for a QTensor, "bf16" / "f32" for a high-precision array,
# ("nvfp4", (1, 16), "packed") for two E2M1 codes per byte.
KINDS = [
    ("nvfp4", (1, 16)),
    ("nvfp4", (16, 16)),
    ("nvfp4", (1, 16), "packed"),
    ("mxfp4", (1, 32)),
    ("mxfp8", (1, 32)),
    ("mxfp8_e5m2", (1, 32)),
    ("fp8", None),
    "bf16",
    "f32",
]


_quantize = jax.jit(formats.quantize, static_argnames=("fmt", "block"))


def _operand(kind, rows, k, seed):
    x = jax.random.normal(jax.random.key(seed), (rows, k)) * 3.0
    if kind == "bf16":
        return x.astype(jnp.bfloat16)
    if kind == "f32":
        return x
    q = _quantize(x, kind[0], block=kind[1])
    return pack(q) if len(kind) == 3 else q


@jax.jit
def _ref(a, b):
    return qmatmul_reference(api._unpacked(a), api._unpacked(b))


def _check(out, ref, k):
    # Products are exact in the compute dtype; only the fp32 summation order differs.
    scale = float(jnp.max(jnp.abs(ref))) + 1.0
    assert_allclose(out, ref, dtype=jnp.float32, contraction=k, scale=scale)


def _rows(kind, n):
    """Round a row count up to the 2-D block height of the kind."""
    return -(-n // 16) * 16 if isinstance(kind, tuple) and kind[1] == (16, 16) else n


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 90),
    k_blocks=st.integers(1, 5),
    a_kind=st.sampled_from(KINDS),
    b_kind=st.sampled_from(KINDS),
)
def test_pallas_matmul_matches_reference_over_shapes_and_operands(m, n, k_blocks, a_kind, b_kind):
    k = 32 * k_blocks
    a = _operand(a_kind, _rows(a_kind, m), k, 0)
    b = _operand(b_kind, _rows(b_kind, n), k, 1)
    _check(qmatmul(a, b, implementation="pallas", interpret=True), _ref(a, b), k)


@pytest.mark.parametrize(
    "decode,a_kind,b_kind",
    [
        ("f32", ("mxfp4", (1, 32)), ("mxfp8", (1, 32))),
        ("fp8", "bf16", ("nvfp4", (16, 16), "packed")),
        ("bf16", ("nvfp4", (1, 16), "packed"), ("nvfp4", (16, 16))),
        ("fp8", "f32", ("mxfp4", (1, 32), "packed")),
    ],
)
def test_ragged_tiles_split_k_and_every_decoder_match_reference(decode, a_kind, b_kind):
    # M, N, K all overhang their tiles (40 / 32, 48 / 32, 160 / 64); split-K 2 leaves the second
    # split a partial last step. Packed operands are unpacked both ways (interleave, even/odd).
    unpack = "split" if a_kind == "f32" or decode == "bf16" else "join"
    cfg = MatmulConfig(block_m=32, block_n=32, block_k=64, split_k=2, decode=decode, unpack=unpack)
    a = _operand(a_kind, 48 if a_kind[1:2] == ((16, 16),) else 40, 160, 2)
    b = _operand(b_kind, 48, 160, 3)
    _check(qmatmul(a, b, interpret=True, config=cfg), _ref(a, b), 160)


def test_weight_only_decode_shape_matches_reference_with_default_tiles():
    # The M <= 16 path: thin row tile, the weight streamed in K steps.
    a = _operand("bf16", 3, 256, 6)
    b = _operand(("nvfp4", (1, 16), "packed"), 64, 256, 7)
    _check(qmatmul(a, b, implementation="pallas", interpret=True), _ref(a, b), 256)
    assert last_implementation() == "pallas"


def test_cpu_default_is_the_xla_reference_and_is_recorded():
    a = _operand(("nvfp4", (1, 16)), 16, 64, 8)
    b = _operand(("nvfp4", (16, 16)), 32, 64, 9)
    out = qmatmul(a, b)
    assert last_implementation() == "xla"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qmatmul_reference(a, b)))
    # The reference itself against plain float math on the dequantized values.
    want = np.asarray(dequantize(a), np.float64) @ np.asarray(dequantize(b), np.float64).T
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)


def test_cudnn_operands_carry_exactly_the_dequantized_values():
    """What jax.nn.scaled_matmul receives (elements, per-row block scales) times the tensor
    scale equals the QTensor's value, for NVFP4 1x16 / 16x16 and MXFP8."""
    for fmt, block in (("nvfp4", (1, 16)), ("nvfp4", (16, 16)), ("mxfp8", (1, 32))):
        q = _operand((fmt, block), 32, 64, 10)
        el, sc = api.cudnn_operands(q)
        bs = 64 // sc.shape[1]
        value = (
            el.astype(jnp.float32) * jnp.repeat(sc.astype(jnp.float32), bs, axis=1) * q.tensor_scale
        )
        np.testing.assert_array_equal(
            np.asarray(value), np.asarray(dequantize(q)), err_msg=f"{fmt} {block}"
        )


def test_bad_input_raises_one_clear_error_each():
    q = _operand(("nvfp4", (1, 16)), 16, 64, 11)
    bad_scales = QTensor(q.codes, q.scales[:, :2], q.tensor_scale, q.fmt, q.block_shape)
    with pytest.raises(KernelInputError, match=r"scales has shape \(16, 2\).*need \(16, 4\)"):
        qmatmul(bad_scales, q)
    with pytest.raises(KernelInputError, match="contraction dims differ"):
        qmatmul(q, _operand("f32", 8, 32, 12))
    with pytest.raises(KernelInputError, match="needs a GPU"):
        qmatmul(q, q, implementation="pallas")
    with pytest.raises(KernelInputError, match="compute capability >= 10"):
        qmatmul(q, q, implementation="cudnn")
    mx4 = _operand(("mxfp4", (1, 32)), 16, 64, 13)
    with pytest.raises(KernelInputError, match="implementation='cudnn' takes"):
        qmatmul(mx4, mx4, implementation="cudnn")
    wide = _quantize(jnp.ones((16, 128)), "mxfp8", block=(1, 64))
    with pytest.raises(KernelInputError, match="cannot take a with block_shape"):
        qmatmul(wide, wide, implementation="pallas", interpret=True)
    with pytest.raises(KernelInputError, match="is not available"):
        qmatmul(q, q, implementation="triton")
    # Raised while tracing: no kernel has to run for the error to appear.
    with pytest.raises(KernelInputError, match="contraction dims differ"):
        jax.jit(qmatmul).lower(q, _operand("f32", 8, 32, 12))


def test_training_through_quantized_dot_gives_the_same_gradients_with_xla_and_pallas():
    """The paper's NVFP4 recipe (16x16 weights, RHT on wgrad, stochastic rounding of gradients):
    fprop, dgrad and wgrad all through qmatmul; the Pallas run in interpret mode via the recipe."""
    import dataclasses

    recipe = get_recipe("nvfp4").linear
    x = jax.random.normal(jax.random.key(0), (32, 64))
    w = jax.random.normal(jax.random.key(1), (64, 48)) * 0.1
    key = jax.random.key(2)

    def loss(recipe, x, w):
        return jnp.sum(jnp.tanh(qdot.quantized_dot(x, w, recipe, key)))

    grads = {}
    for impl in ("xla", "pallas"):
        r = dataclasses.replace(recipe, implementation=impl, interpret=impl == "pallas")
        grads[impl] = jax.jit(jax.grad(functools.partial(loss, r), argnums=(0, 1)))(x, w)
        assert last_implementation() == impl
    for g_xla, g_pallas, contraction in zip(grads["xla"], grads["pallas"], (48, 32)):
        assert float(jnp.max(jnp.abs(g_xla))) > 0
        _check(g_pallas, g_xla, contraction)
