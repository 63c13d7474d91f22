"""A full-cache decode step's and `extend`'s logits equal the full forward's at those positions, on a
hybrid (attention + SSD) stack, so both cache kinds are exercised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.config import Decode
from horizon.eval.harness import logits_fn
from horizon.infer import step as steps
from tests.infer._models import tiny_lm


@pytest.fixture(scope="module")
def model():
    """Hybrid: one attention and one SSD layer, so both cache kinds are exercised."""
    return tiny_lm(layer_pattern="attn,ssd")


def test_full_cache_step_and_extend_logits_equal_the_full_forward(model):
    rng = np.random.default_rng(1)
    row = rng.integers(0, 32, 12).astype(np.int32)
    want = logits_fn(model)(row[None])[0]
    P = 7
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        caches = steps.init_caches(m, Decode(), batch=1, capacity=16)
        _, caches = steps.prefill(m, caches, jnp.asarray(row[None, :P]), jnp.asarray([P]))
        from horizon.infer.selectors import get_selector

        step_logits, caches, _ = steps.decode_step(m, caches, jnp.asarray(row[P:P + 1]), get_selector("full"),
                                                   [()] * len(caches))
        ext_logits, _ = steps.extend(m, caches, jnp.asarray(row[None, P + 1:]))
        return step_logits, ext_logits

    step_logits, ext_logits = run(state)
    np.testing.assert_allclose(np.asarray(step_logits)[0], want[P], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ext_logits)[0], want[P + 1:], rtol=1e-5, atol=1e-5)


