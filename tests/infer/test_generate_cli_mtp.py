"""`horizon generate --speculative mtp`: on a run whose model has parallel MTP heads, the greedy text
equals the library's plain greedy decoding; a cache it cannot verify with is a ConfigError (the CLI's
one-line exit 2)."""

import io
import json

import numpy as np
import pytest

from horizon.config import Decode
from horizon.data.tokenizer import get_tokenizer
from horizon.errors import ConfigError
from horizon.infer.cli import main
from horizon.infer.generate import generate
from horizon.models import load


@pytest.fixture(scope="module")
def mtp_run_dir(tmp_path_factory):
    """A run directory (config.json + a parameters checkpoint) of a randomly initialised model with two
    parallel MTP heads (init_std 0.3: peaky logits, so greedy has no near-ties)."""
    from flax import nnx

    from horizon.config import Experiment, Model, Objective, to_dict
    from horizon.models.lm import LM
    from horizon.train.checkpoint import save_params

    d = tmp_path_factory.mktemp("mtp_run")
    cfg = Experiment(name="tiny_mtp", model=Model(d_model=16, n_layers=1, n_heads=2, init_std=0.3,
                                                  objective=Objective(mtp="parallel", mtp_depth=2)))
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    save_params(d / "checkpoints", nnx.to_pure_dict(nnx.state(LM(cfg.model, rngs=nnx.Rngs(0)))))
    return d


def test_generate_speculative_mtp_prints_the_greedy_continuation(mtp_run_dir, capsys):
    out = io.StringIO()
    text = main([str(mtp_run_dir), "--prompt", "def main():", "--max-new-tokens", "10", "--temperature", "0",
                 "--speculative", "mtp"], out=out)
    model, _ = load(mtp_run_dir)
    prompt = get_tokenizer().encode("def main():").astype(np.int32)[None]
    want = generate(model, prompt, decode=Decode(max_new_tokens=10))
    assert text == get_tokenizer().decode(want.tokens[0])
    assert out.getvalue() == text + "\n"
    assert "tokens per target forward" in capsys.readouterr().err


def test_generate_speculative_mtp_with_a_streaming_cache_is_a_config_error(mtp_run_dir):
    with pytest.raises(ConfigError, match="full cache"):
        main([str(mtp_run_dir), "--prompt", "x", "--speculative", "mtp", "--cache", "streaming",
              "--cache-size", "8"], out=io.StringIO())
