"""`horizon generate` on a tiny trained run: streams a continuation under a streaming cache (greedy,
so it equals the library's greedy tokens), and bad input is one line on stderr with exit code 2."""

import io
import subprocess
import sys

import numpy as np
import pytest

from horizon.config import Decode
from horizon.data.tokenizer import get_tokenizer
from horizon.infer.cli import main
from horizon.infer.generate import generate
from horizon.models import load


@pytest.fixture
def run_dir(tiny_run_dir):
    return tiny_run_dir


def test_generate_streams_the_greedy_continuation(run_dir):
    out = io.StringIO()
    text = main([str(run_dir), "--prompt", "def main():", "--cache", "streaming", "--cache-size", "12",
                 "--n-sinks", "2", "--max-new-tokens", "10", "--temperature", "0", "--chunk", "3"], out=out)
    model, _ = load(run_dir)
    prompt = get_tokenizer().encode("def main():").astype(np.int32)[None]
    want = generate(model, prompt, decode=Decode(cache="streaming", cache_size=12, n_sinks=2, max_new_tokens=10))
    assert text == get_tokenizer().decode(want.tokens[0])
    assert out.getvalue() == text + "\n"


def test_generate_bad_sampling_input_is_one_line_and_exit_2(run_dir):
    proc = subprocess.run([sys.executable, "-m", "horizon.cli", "generate", str(run_dir), "--prompt", "x",
                           "--top-p", "1.5"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "decode.top_p" in lines[0]
