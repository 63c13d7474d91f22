"""Multi-process training: 2 local CPU processes x 4 devices each train one run on an 8-device mesh,
a SIGTERM to one process stops both at the same step with a checkpoint, and the resumed run
matches an uninterrupted single-process run on the same mesh; only process 0 writes metrics.

Run as a script, this file is the worker: RUN_DIR STEPS PROCESS_ID PORT (config|env).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve()
STEPS = 10
pytestmark = pytest.mark.slow


def _experiment(run_dir, steps, distributed=None):
    import dataclasses

    sys.path.insert(0, str(HERE.parents[1]))
    from conftest import tiny_experiment

    from horizon.config import Distributed, Mesh

    cfg = tiny_experiment(run_dir=str(run_dir), mesh=Mesh(data=2, fsdp=2, tensor=2),
                          distributed=distributed or Distributed())
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, checkpoint_every=4,
                                                              eval_every=5))


def _worker(run_dir, steps, pid, port, how):
    from horizon.config import Distributed
    from horizon.train import loop

    if how == "env":  # the launcher's environment describes the job
        os.environ.update(HORIZON_COORDINATOR_ADDRESS=f"localhost:{port}", HORIZON_NUM_PROCESSES="2",
                          HORIZON_PROCESS_ID=pid)
        dist = Distributed()
    else:
        dist = Distributed(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(pid))
    cfg = _experiment(run_dir, int(steps), dist)

    pause = 0.3 if how == "config" else 0.0

    class Bar:  # reports progress so the test can signal mid-run; slows steps so the signal lands
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, k):
            self.n += 1
            print("READY" if self.n == 1 else "STEP", flush=True)
            time.sleep(pause)

        def set_postfix(self, **k):
            pass

        def close(self):
            pass

    loop.progress_bar = Bar
    res = loop.train(cfg, log=lambda m: print(m, flush=True))
    print("STOPPED_EARLY" if res.stopped_early else "DONE", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(run_dir, how, cache):
    # A shared compilation cache lets the resumed processes reuse the first ones' executables.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(HERE.parents[2]), "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(HERE), str(run_dir), str(STEPS), str(pid), str(port), how],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for pid in (0, 1)]


def _read_until(proc, word, lines):
    for line in proc.stdout:
        lines.append(line)
        if word in line:
            return
    raise AssertionError(f"never printed {word}: {''.join(lines)[-3000:]}")


def _finish(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_stop_together_and_resume_to_the_single_process_result(tmp_path):
    import chex
    import numpy as np

    from horizon.models import load
    from horizon.train import loop
    from horizon.train.metrics import read_metrics

    run = tmp_path / "mp"
    procs = _launch(run, "config", tmp_path / "cache")
    lines = [[], []]
    for p, ls in zip(procs, lines):
        _read_until(p, "READY", ls)
    procs[1].send_signal(signal.SIGTERM)  # only one process sees it; both must stop at the same step
    outs = _finish(procs)
    assert all("STOPPED_EARLY" in "".join(ls) + out for ls, out in zip(lines, outs)), outs
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS

    # Resume; this time the environment describes the job (as a launcher would).
    outs = _finish(_launch(run, "env", tmp_path / "cache"))
    assert f"resumed from step {saved[-1]}" in outs[0] and "DONE" in outs[0] and "DONE" in outs[1]
    assert "resumed from" not in outs[1]  # process 1 logs nothing

    ref = loop.train(_experiment(tmp_path / "ref", STEPS), log=lambda m: None)
    got = read_metrics(run)
    want = read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))  # written once, by process 0
    for key in ("loss", "eval_loss"):
        a = [(r["step"], r[key]) for r in got if key in r]
        b = [(r["step"], r[key]) for r in want if key in r]
        assert [s for s, _ in a] == [s for s, _ in b]
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    from flax import nnx

    model, _ = load(run)  # saved on 8 devices in 2 processes, restored on 1
    chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model)), ref.params, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
