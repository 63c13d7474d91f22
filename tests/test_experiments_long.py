"""The long-context experiments run end to end with tiny settings through their command lines and
write their report, results and plots."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
TINY = ["--train.seed", "1", "--model.d-model", "32", "--model.n-heads", "2", "--model.n-layers", "1",
        "--data.seq-len", "128", "--data.batch-size", "4", "--train.eval-batches", "1"]


def _run(name, args, tmp_path):
    run_dir = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *TINY, *args, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Claim" in (run_dir / "report.md").read_text()
    return run_dir, json.loads((run_dir / "result.json").read_text())


@pytest.mark.slow
def test_context_extension_runs_end_to_end(tmp_path):
    run_dir, res = _run("context_extension", ["--train.steps", "4", "--train.log-every", "2"], tmp_path)
    assert res["lengths"] == [128, 512, 1024]
    assert set(res["accuracy"]) == {"none", "pi", "ntk", "yarn", "pose", "prolong"}
    for v in res["accuracy"].values():
        for by_len in v.values():
            assert all(0.0 <= a <= 1.0 for a in by_len.values())
    assert max(res["loss_by_position"]["none"]["bucket_start"]) >= 512  # the curve reaches 8T
    for png in ("loss_by_position.png", "passkey_by_variant.png", "passkey_yarn.png"):
        assert (run_dir / png).stat().st_size > 0


@pytest.mark.slow
def test_mtp_hlp_runs_end_to_end(tmp_path):
    run_dir, res = _run("mtp_hlp", ["--train.steps", "2", "--train.log-every", "1"], tmp_path)
    assert set(res["results"]) == {"next-token", "MTP parallel (n=2)", "MTP sequential (D=1)", "HLP"}
    for r in res["results"].values():
        assert 0.0 <= r["exact_match"] <= 1.0 and r["heldout_loss"] > 0
    assert res["n_infill"] == 16 and (run_dir / "train_loss.png").exists()
    spec = res["self_speculation"]["MTP parallel (n=2)"]  # the parallel-heads model drafts with its heads
    assert set(res["self_speculation"]) == {"MTP parallel (n=2)"} and spec["draft_tokens"] == 1
    assert 0.0 <= spec["mean_accepted"] <= 1.0 and spec["acceptance_by_head"] == [spec["mean_accepted"]]
    assert 1.0 <= spec["tokens_per_forward"] <= 2.0
    assert "Self-speculative greedy decoding" in (run_dir / "report.md").read_text()
