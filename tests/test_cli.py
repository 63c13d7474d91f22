"""The CLI: user errors print one line and exit 2 without a traceback; the quickstart runs end to end."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def _assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in err[0], err[0]


def test_unknown_experiment_lists_available():
    _assert_one_line_error(_run("-m", "horizon.cli", "run", "nope"), "nope", "quickstart")


def test_wrong_typed_value_is_one_line():
    _assert_one_line_error(_run("-m", "experiments.quickstart", "--train.steps", "many"), "many")


def test_bad_config_value_is_one_line():
    _assert_one_line_error(_run("-m", "experiments.quickstart", "--model.n-heads", "5"), "model.n_heads")


def test_missing_data_store_is_one_line(tmp_path):
    _assert_one_line_error(_run("-m", "horizon.cli", "run", "quickstart", "--data.store", str(tmp_path / "x")),
                           "no token store")


def test_list_shows_experiments_with_claims():
    proc = _run("-m", "horizon.cli", "list")
    assert proc.returncode == 0 and "quickstart" in proc.stdout and "unigram" in proc.stdout


def test_data_build_writes_a_store(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("abc")
    proc = _run("-m", "horizon.cli", "data", "build", "--source", str(src), "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["n_tokens"] == 3
    again = _run("-m", "horizon.cli", "data", "build", "--source", str(src), "--out", str(tmp_path / "s"))
    _assert_one_line_error(again, "already exists")


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "qs"
    proc = _run("-m", "experiments.quickstart", "--train.steps", "5", "--train.eval-every", "5",
                "--train.checkpoint-every", "5", "--train.seed", "1", "--model.d-model", "48", "--model.n-heads", "4",
                "--model.n-layers", "2", "--data.seq-len", "64", "--data.batch-size", "4", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "report.md", "loss.png", "result.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "5").exists()
    assert any(p.name.startswith("events") for p in (run_dir / "tensorboard").iterdir())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5]
    assert [r["step"] for r in records if "eval_loss" in r] == [5]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["steps"] == 5 and cfg["model"]["d_model"] == 48 and cfg["train"]["seed"] == 1
    assert "Claim" in (run_dir / "report.md").read_text()
