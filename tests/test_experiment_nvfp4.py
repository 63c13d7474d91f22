"""experiments.nvfp4_recipe runs end to end at tiny size (two recipes, in process) and reports them."""

import dataclasses
import json

import pytest

from horizon.config import Data, Model, Train


@pytest.mark.slow
def test_nvfp4_recipe_experiment_runs_end_to_end(tmp_path):
    from experiments import nvfp4_recipe

    cfg = dataclasses.replace(
        nvfp4_recipe.CONFIG, run_dir=str(tmp_path),
        model=Model(d_model=32, n_layers=3, n_heads=2), data=Data(seq_len=32, batch_size=8),
        train=Train(steps=2, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1, progress=False))
    out = nvfp4_recipe.run(cfg, recipes=("bf16", "nvfp4"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["results"]) == {"bf16", "nvfp4"} == set(out["results"])
    losses = {k: v["eval_loss"] for k, v in result["results"].items()}
    assert losses["nvfp4"] != losses["bf16"]  # the recipe really changed the numerics
    assert result["best_4bit"] == "nvfp4" and "Reproduced" in (tmp_path / "report.md").read_text()
