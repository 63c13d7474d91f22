"""Resume: a run killed with SIGKILL after its mid-run checkpoint and resumed ends bit-identical to
an uninterrupted run; SIGTERM leaves a restorable checkpoint; a corrupt latest checkpoint falls
back to the previous one; a run directory of another model config is refused."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import chex
import pytest

from horizon.errors import CheckpointError
from horizon.models import load
from horizon.train.metrics import read_metrics

SCRIPT = pathlib.Path(__file__).with_name("_train_script.py")
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.slow


def _start(*args):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def _wait_for(proc, word, timeout=240):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if word in line:
            return lines
    proc.wait(timeout=timeout)
    raise AssertionError(f"never printed {word}: {''.join(lines)[-2000:]}")


def _finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    N = 8
    full = _start(tmp_path / "full", N)
    killed = _start(tmp_path / "resumed", N, "kill-after-checkpoint", N // 2)
    _wait_for(killed, "CHECKPOINTED")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    out = _finish(_start(tmp_path / "resumed", N))
    assert f"resumed from step {N // 2}" in out
    _finish(full)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    assert [s for s, _ in _losses(tmp_path / "full")] == list(range(1, N + 1))
    a, _ = load(tmp_path / "resumed")
    b, _ = load(tmp_path / "full")
    from flax import nnx

    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b)))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    proc = _start(tmp_path / "run", 400, "sigterm-ready")
    _wait_for(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "STOPPED_EARLY" in out
    model, cfg = load(tmp_path / "run")
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 400
    assert cfg.train.steps == 400 and model.cfg == cfg.model


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    _finish(_start(tmp_path / "run", 6))  # checkpoints at 3 and 6
    ckpts = tmp_path / "run" / "checkpoints"
    for f in (ckpts / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    out = _finish(_start(tmp_path / "run", 6))
    assert "step 6" in out and "unreadable" in out and "resumed from step 3" in out
    assert [s for s, _ in _losses(tmp_path / "run")] == list(range(1, 7))


def test_run_dir_of_another_model_is_refused_and_kept(tmp_path):
    _finish(_start(tmp_path / "run", 2))
    cfg_path = tmp_path / "run" / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["model"]["d_model"] = 64
    cfg_path.write_text(json.dumps(saved))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    proc = _start(tmp_path / "run", 2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "different model config" in out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert json.loads(cfg_path.read_text())["model"]["d_model"] == 64  # nothing overwritten
    with pytest.raises(CheckpointError):
        # the checkpoint does not fit a d_model=64 model
        load(tmp_path / "run")
