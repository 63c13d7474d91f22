"""RoPE and its scalings against closed forms worked out by hand (D = 8, base 10^4, so the plain
inverse frequencies are 1, 0.1, 0.01, 0.001), the wiring through the model, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from horizon.attention.rope import apply_rope, rope_for_positions, scaled_inverse_frequencies
from horizon.config import Data, Experiment, Model, Pose, Rope
from horizon.errors import ConfigError
from horizon.eval.harness import check_length, representable_length
from horizon.models.lm import LM, with_config

PLAIN = [1.0, 0.1, 0.01, 0.001]


def _freqs(rope, length=None):
    inv, scale = scaled_inverse_frequencies(8, 10_000.0, rope, length)
    return np.asarray(inv, np.float64), float(scale)


def test_plain_frequencies_are_powers_of_the_base():
    inv, scale = _freqs(Rope())
    np.testing.assert_allclose(inv, PLAIN, rtol=1e-6)
    assert scale == 1.0


def test_linear_interpolation_divides_every_frequency_by_the_factor():
    inv, scale = _freqs(Rope(scaling="linear", factor=4))
    np.testing.assert_allclose(inv, [0.25, 0.025, 0.0025, 0.00025], rtol=1e-6)
    assert scale == 1.0


def test_ntk_keeps_the_highest_and_interpolates_the_lowest_frequency_by_the_factor():
    # b' = 10^4 * 4^(8/6); theta_i' = b'^(-i/4): i=0 -> 1, i=3 -> 10^-3 * 4^(-(8/6)(3/4)) = 10^-3 / 4
    inv, _ = _freqs(Rope(scaling="ntk", factor=4))
    b = 1e4 * 4 ** (8 / 6)
    np.testing.assert_allclose(inv, [1.0, b ** -0.25, b ** -0.5, 0.001 / 4], rtol=1e-5)


def test_yarn_ramp_leaves_fast_dims_interpolates_slow_dims_and_blends_between():
    # L = 2048: rotations r_i = 2048 theta_i / (2 pi) = 325.9, 32.59, 3.259, 0.3259.
    # gamma = clip((r - 1) / 31): 1, 1, 2.259/31 = 0.07288, 0.
    inv, scale = _freqs(Rope(scaling="yarn", factor=4, original_length=2048))
    g2 = (2048 * 0.01 / (2 * math.pi) - 1) / 31
    assert abs(g2 - 0.07288) < 1e-4
    np.testing.assert_allclose(inv, [1.0, 0.1, (1 - g2) * 0.01 / 4 + g2 * 0.01, 0.001 / 4], rtol=1e-5)
    assert abs(scale - (0.1 * math.log(4) + 1)) < 1e-12 and abs(scale - 1.1386294) < 1e-6


def test_dynamic_ntk_follows_the_current_length():
    rope = Rope(scaling="dynamic_ntk", original_length=64)
    short, _ = _freqs(rope, length=50)  # s = max(1, 50/64) = 1: plain
    np.testing.assert_allclose(short, PLAIN, rtol=1e-5)
    pos = jnp.arange(256)[None]  # length 256 = 4 x 64: the NTK frequencies with s = 4
    inv, _ = jax.jit(lambda p: rope_for_positions(8, 1e4, rope, p))(pos)
    np.testing.assert_allclose(np.asarray(inv), _freqs(Rope(scaling="ntk", factor=4))[0], rtol=1e-5)


def test_apply_rope_rotates_each_pair_and_applies_the_scale():
    a, b, p, theta, scale = 0.3, -1.2, 5.0, 0.1, 1.5
    x = jnp.array([a, b], jnp.float32).reshape(1, 1, 1, 2)
    out = np.asarray(apply_rope(x, jnp.array([[p]]), jnp.array([theta]), scale)).ravel()
    phi = p * theta
    want = [scale * (a * math.cos(phi) - b * math.sin(phi)), scale * (b * math.cos(phi) + a * math.sin(phi))]
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_linear_scaled_model_at_stretched_positions_equals_plain_model():
    """Position interpolation: positions s*t under factor s are positions t unscaled, end to end."""
    cfg = Model(d_model=32, n_layers=2, n_heads=2, vocab_size=64, init_std=0.5)  # position-sensitive
    plain = LM(cfg, rngs=nnx.Rngs(0))
    scaled = with_config(plain, Model(d_model=32, n_layers=2, n_heads=2, vocab_size=64, init_std=0.5,
                                      rope=Rope(scaling="linear", factor=4)))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 64)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    a = np.asarray(plain(tokens, positions_BT=pos))
    b = np.asarray(scaled(tokens, positions_BT=4 * pos))
    c = np.asarray(scaled(tokens, positions_BT=pos))
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert np.abs(a - c).max() > 0.05 * np.abs(a).max()  # the scaling is live: unstretched positions differ


def test_with_config_refuses_a_config_that_changes_the_parameters():
    model = LM(Model(d_model=32, n_layers=1, n_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="changes the parameters"):
        with_config(model, Model(d_model=32, n_layers=2, n_heads=2))


@pytest.mark.parametrize("make, field", [
    (lambda: Rope(scaling="linear", factor=0.5), "model.rope.factor"),
    (lambda: Rope(scaling="yarn", factor=2.0), "model.rope.original_length"),
    (lambda: Rope(scaling="yarn", factor=2.0, original_length=64, yarn_alpha=40.0), "model.rope.yarn_alpha"),
])
def test_bad_rope_config_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()


def test_evaluation_length_beyond_representable_positions_names_the_fix():
    cfg = Experiment(data=Data(seq_len=256))
    with pytest.raises(ConfigError, match="--rope-scaling yarn --rope-factor 4.*--allow-extrapolation"):
        check_length(cfg, 1024)
    check_length(cfg, 1024, allow_extrapolation=True)
    yarn = Model(rope=Rope(scaling="yarn", factor=4, original_length=256))
    check_length(cfg, 1024, model_cfg=yarn)
    with pytest.raises(ConfigError, match="--lengths"):
        check_length(cfg, 2048, model_cfg=yarn)
    assert representable_length(Experiment(data=Data(seq_len=256, pose=Pose(target_length=2048)))) == 2048
    assert representable_length(cfg, Model(rope=Rope(scaling="dynamic_ntk", original_length=256))) == math.inf
    # a run that trained with its scaling (PoSE to 2048 under 8x interpolation) represents what it trained on
    pose_run = Experiment(data=Data(seq_len=256, pose=Pose(target_length=2048)),
                          model=Model(rope=Rope(scaling="linear", factor=8)))
    assert representable_length(pose_run) == 2048
