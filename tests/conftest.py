"""Test session set-up: 8 simulated CPU devices before jax is imported anywhere, and tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import pytest  # noqa: E402


def tiny_experiment(**overrides):
    """A model and run small enough to train a few steps in seconds on CPU."""
    from horizon.config import Data, Experiment, Model, Optim, Train

    base = Experiment(
        name="tiny",
        model=Model(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
        data=Data(seq_len=32, batch_size=8),
        optim=Optim(lr=1e-2, warmup_steps=2),
        train=Train(steps=6, log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3, progress=False),
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def tiny():
    return tiny_experiment


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    """A run directory trained for one step with a checkpoint (what `horizon eval` / `generate` load)."""
    from horizon.config import Data, Experiment, Model, Train
    from horizon.train.loop import train

    d = tmp_path_factory.mktemp("run")
    cfg = Experiment(name="tiny", model=Model(d_model=16, n_layers=1, n_heads=2), data=Data(seq_len=32, batch_size=8),
                     train=Train(steps=1, log_every=1, eval_every=1, eval_batches=1, checkpoint_every=1,
                                 progress=False), run_dir=str(d))
    train(cfg, log=lambda *_: None)
    return d
