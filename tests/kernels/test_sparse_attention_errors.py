"""Bad input to kernels.sparse_attention.attend raises one clear KernelInputError at trace time
(under jax.eval_shape, before anything runs): selection shapes that do not match q/k, block sizes
that do not tile the padded lengths, head counts that do not divide, unusable implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.errors import KernelInputError
from kernels.sparse_attention import Selection, attend, with_transpose
from kernels.sparse_attention.selection import tables_from_masks


def _sel(t, bq=16, bk=16, b=1):
    n_q, n_k = -(-t // bq), -(-t // bk)
    live = np.ones((1, 1, n_q, n_k), bool)
    kvb, cnt, fc = tables_from_masks(live, np.zeros_like(live))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return with_transpose(
        Selection(
            kv_blocks=kvb,
            counts=cnt,
            full_counts=fc,
            q_positions=pos,
            k_positions=pos,
            block_q=bq,
            block_k=bk,
            causal=True,
        )
    )


def _shapes(b=1, t=32, h=4, g=2, d=16, s=None, dtype=jnp.float32):
    s = t if s is None else s
    return (
        jax.ShapeDtypeStruct((b, t, h, d), dtype),
        jax.ShapeDtypeStruct((b, s, g, d), dtype),
        jax.ShapeDtypeStruct((b, s, g, d), dtype),
    )


def _trace(sel, *shapes, **kw):
    kw.setdefault("implementation", "xla")
    return jax.eval_shape(lambda q, k, v: attend(q, k, v, sel, **kw), *shapes)


def test_valid_input_traces():
    assert _trace(_sel(32), *_shapes()).shape == (1, 32, 4, 16)


@pytest.mark.parametrize("sel_t,match", [(48, "query blocks"), (16, "query blocks")])
def test_selection_built_for_another_length_is_rejected(sel_t, match):
    with pytest.raises(KernelInputError, match=match):
        _trace(_sel(sel_t), *_shapes(t=32))


def test_block_size_that_does_not_tile_the_padded_length_is_rejected():
    sel = _sel(32, bq=16).replace(block_q=8)  # tables for 2 blocks of 16, claimed blocks of 8
    with pytest.raises(KernelInputError, match="block_q=8"):
        _trace(sel, *_shapes(t=32))


def test_key_positions_of_the_wrong_length_are_rejected():
    sel = _sel(32)
    with pytest.raises(KernelInputError, match="k_positions"):
        _trace(sel.replace(k_positions=np.arange(40, dtype=np.int32)[None]), *_shapes(t=32))


def test_selection_batch_that_is_neither_one_nor_b_is_rejected():
    with pytest.raises(KernelInputError, match="q_positions"):
        _trace(_sel(32, b=3), *_shapes(b=2, t=32))


def test_heads_that_do_not_divide_are_rejected():
    with pytest.raises(KernelInputError, match="not a multiple of kv heads G=4"):
        _trace(_sel(32), *_shapes(h=6, g=4))


def test_selection_heads_other_than_one_or_h_are_rejected():
    sel = _sel(32)
    kvb = np.repeat(np.asarray(sel.kv_blocks), 3, 1)
    bad = sel.replace(
        kv_blocks=kvb,
        counts=np.repeat(np.asarray(sel.counts), 3, 1),
        full_counts=None,
        q_blocks=None,
        q_slots=None,
        q_counts=None,
        q_full_counts=None,
    )
    with pytest.raises(KernelInputError, match="Hs=3"):
        _trace(bad, *_shapes(h=4, g=2))


def test_mismatched_head_dims_and_dtypes_are_rejected():
    q, k, v = _shapes()
    with pytest.raises(KernelInputError, match="head dim"):
        _trace(
            _sel(32),
            q,
            jax.ShapeDtypeStruct((1, 32, 2, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, 32, 2, 8), jnp.float32),
        )
    with pytest.raises(KernelInputError, match="dtypes differ"):
        _trace(
            _sel(32),
            q,
            jax.ShapeDtypeStruct(k.shape, jnp.bfloat16),
            jax.ShapeDtypeStruct(v.shape, jnp.bfloat16),
        )


def test_pallas_needs_power_of_two_blocks_and_a_gpu_or_interpret():
    with pytest.raises(KernelInputError, match="power of two"):
        _trace(_sel(48, bq=24, bk=16), *_shapes(t=48), implementation="pallas", interpret=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(KernelInputError, match="interpret=True"):
            _trace(_sel(32), *_shapes(), implementation="pallas")


def test_unknown_implementation_and_shift_without_frequencies_are_rejected():
    with pytest.raises(KernelInputError, match="implementation='triton'"):
        _trace(_sel(32), *_shapes(), implementation="triton")
    sel = _sel(32)
    with pytest.raises(KernelInputError, match="rope_inv_freq"):
        _trace(sel.replace(kv_shift=np.zeros_like(np.asarray(sel.kv_blocks))), *_shapes())
