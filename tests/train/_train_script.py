"""Subprocess driver for the resume tests: trains the tiny config in a run directory.

argv: RUN_DIR STEPS [kill-after-checkpoint STEP | sigterm-ready]
With `kill-after-checkpoint S` the script prints CHECKPOINTED once step S's checkpoint is on disk,
then sleeps so the test can SIGKILL it. With `sigterm-ready` it prints READY after the first step.
"""

import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import tiny_experiment  # noqa: E402

from horizon.config import Mesh  # noqa: E402
from horizon.train import checkpoint, loop  # noqa: E402

run_dir, steps = sys.argv[1], int(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else ""
cfg = tiny_experiment(run_dir=run_dir, mesh=Mesh(data=-1))
cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, checkpoint_every=steps // 2))

if mode == "kill-after-checkpoint":
    at = int(sys.argv[4])
    save = checkpoint.Checkpointer.save

    def save_then_wait(self, state, force=False):
        save(self, state, force=force)
        if int(state.step) == at:
            self.wait()
            print("CHECKPOINTED", flush=True)
            time.sleep(600)

    checkpoint.Checkpointer.save = save_then_wait
elif mode == "sigterm-ready":
    fn = loop.MetricsWriter.write

    def write_then_signal(self, rec):
        fn(self, rec)
        if rec.get("step") == 1 and "loss" in rec:
            print("READY", flush=True)
            time.sleep(0.5)

    loop.MetricsWriter.write = write_then_signal

res = loop.train(cfg, log=lambda m: print(m, flush=True))
print("STOPPED_EARLY" if res.stopped_early else "DONE", flush=True)
