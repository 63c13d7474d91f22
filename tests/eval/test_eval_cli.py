"""`horizon eval` on a saved run: writes JSON / PNG / markdown for a task and for the loss curve,
applies a RoPE override, and refuses lengths the model cannot represent with one line naming the fix."""

import json
import subprocess
import sys

import pytest

from horizon.errors import ConfigError
from horizon.eval.cli import main


@pytest.fixture
def run_dir(tiny_run_dir):
    return tiny_run_dir


def test_eval_writes_results_with_a_rope_override(run_dir):
    res = main([str(run_dir), "--task", "passkey", "--lengths", "128", "--xs", "0.2,0.8", "--samples", "2",
                "--batch-size", "4", "--rope-scaling", "yarn", "--rope-factor", "4"])
    assert res["rope"]["scaling"] == "yarn" and res["rope"]["original_length"] == 32
    assert res["lengths"] == [128] and len(res["accuracy"]) == 1 and len(res["accuracy"][0]) == 2
    saved = json.loads((run_dir / "eval" / "passkey.json").read_text())
    assert saved["accuracy"] == res["accuracy"]
    assert (run_dir / "eval" / "passkey.png").stat().st_size > 0
    assert "| 128 |" in (run_dir / "eval" / "passkey.md").read_text()


def test_eval_loss_curve_extends_past_the_trained_length(run_dir):
    res = main([str(run_dir), "--task", "perplexity", "--lengths", "64", "--samples", "1", "--batch-size", "2",
                "--allow-extrapolation"])
    starts = res["curves"][64]["bucket_start"]
    assert max(starts) >= 32 and (run_dir / "eval" / "perplexity.png").exists()


def test_unrepresentable_length_is_one_clear_error(run_dir):
    with pytest.raises(ConfigError, match="--allow-extrapolation"):
        main([str(run_dir), "--task", "passkey", "--lengths", "128"])
    proc = subprocess.run([sys.executable, "-m", "horizon.cli", "eval", str(run_dir), "--task", "passkey",
                           "--lengths", "128"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rope-scaling" in lines[0] and "--allow-extrapolation" in lines[0]
