"""`horizon eval RUN_DIR --task NAME --lengths 512,1024,2048 [...]`: any synthetic task (or the
per-position loss curve, `--task perplexity`) on any saved run, optionally with another RoPE scaling
or attention policy. Writes JSON, a PNG and a markdown table under RUN_DIR/eval (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from horizon.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, through the CLI's user-error path
        raise ConfigError(f"horizon eval: {message}")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def parser() -> argparse.ArgumentParser:
    from horizon.config import ROPE_SCALINGS
    from horizon.eval.tasks import TASKS

    p = _Parser(prog="horizon eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by horizon (config.json + checkpoints/)")
    p.add_argument("--task", required=True, help=f"one of {', '.join([*TASKS, 'perplexity'])}")
    p.add_argument("--lengths", required=True, help="comma-separated sequence lengths in tokens")
    p.add_argument("--xs", default=None, help="the task's second axis (depths, segments, chain lengths); "
                                              "default: the task's own")
    p.add_argument("--samples", type=int, default=8, help="samples per (length, x) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--policy", default=None, help="attention policy (model.attention.policy) to evaluate with")
    p.add_argument("--window", type=int, default=None, help="model.attention.window for --policy")
    p.add_argument("--n-sinks", type=int, default=None, help="model.attention.n_sinks for --policy")
    p.add_argument("--rope-scaling", default=None, choices=ROPE_SCALINGS, help="RoPE scaling (model.rope.scaling)")
    p.add_argument("--rope-factor", type=float, default=None, help="model.rope.factor (extended / trained length)")
    p.add_argument("--rope-original-length", type=int, default=None,
                   help="model.rope.original_length (default: the run's trained length)")
    p.add_argument("--rope-theta", type=float, default=None, help="override model.rope_theta (base)")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="evaluate lengths beyond what the model's positions represent, unscaled")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval)")
    return p


def eval_model_config(cfg, a):
    """The run's model config with the command line's RoPE / theta / policy overrides applied."""
    from horizon.config import Rope
    from horizon.eval.harness import trained_length

    m = cfg.model
    if a.rope_scaling is not None or a.rope_factor is not None or a.rope_original_length is not None:
        m = dataclasses.replace(m, rope=Rope(
            scaling=a.rope_scaling or m.rope.scaling,
            factor=m.rope.factor if a.rope_factor is None else a.rope_factor,
            original_length=a.rope_original_length or m.rope.original_length or trained_length(cfg)))
    if a.rope_theta is not None:
        m = dataclasses.replace(m, rope_theta=a.rope_theta)
    att = {k: v for k, v in (("policy", a.policy), ("window", a.window), ("n_sinks", a.n_sinks)) if v is not None}
    if att:
        m = dataclasses.replace(m, attention=dataclasses.replace(m.attention, **att))
    return m


def _run_config(run_dir):
    import json

    from horizon.config import Experiment, from_dict
    from horizon.errors import CheckpointError

    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no config.json; pass a run directory written by horizon")
    return from_dict(Experiment, json.loads(path.read_text()))


def main(argv: list[str]) -> dict:
    from horizon.eval.harness import check_length, evaluate_task
    from horizon.eval.report import markdown_table, plot_curves, plot_heatmap, write_json
    from horizon.eval.tasks import get_task
    from horizon.models import load
    from horizon.models.lm import with_config

    a = parser().parse_args(argv)
    lengths = [int(v) for v in _floats(a.lengths, "--lengths")]
    if not lengths or min(lengths) < 2:
        raise ConfigError(f"--lengths: {a.lengths!r} must list lengths >= 2")
    if a.samples < 1:
        raise ConfigError(f"--samples: {a.samples} must be >= 1")
    task = None if a.task == "perplexity" else get_task(a.task)
    cfg = _run_config(a.run_dir)
    mcfg = eval_model_config(cfg, a)
    for L in lengths:  # before loading anything heavy
        check_length(cfg, L, model_cfg=mcfg, allow_extrapolation=a.allow_extrapolation)
    model, cfg = load(a.run_dir)
    if mcfg != cfg.model:
        model = with_config(model, mcfg)
    out = pathlib.Path(a.out) if a.out else pathlib.Path(a.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    settings = {"rope": dataclasses.asdict(mcfg.rope), "rope_theta": mcfg.rope_theta,
                "attention": dataclasses.asdict(mcfg.attention)}

    if task is None:
        from horizon.config import Pose
        from horizon.data.batches import Batches
        from horizon.data.corpus import load_store
        from horizon.eval.perplexity import loss_by_position

        store = load_store(cfg.data.store)
        curves = {}
        for L in lengths:
            data = dataclasses.replace(cfg.data, seq_len=L, batch_size=a.batch_size, fim_rate=0.0, pose=Pose())
            curves[L] = loss_by_position(model, Batches(store, data, split="heldout", seed=a.seed),
                                         n_batches=a.samples, bucket=max(1, max(lengths) // 16))
        result = {"run_dir": str(a.run_dir), "task": "perplexity", **settings, "curves": curves}
        plot_curves(out / "perplexity.png", {f"length {L}": (c["bucket_start"], c["loss"]) for L, c in curves.items()},
                    xlabel="position", ylabel="held-out loss (nats)", title=f"{cfg.name}: loss by position")
        table = markdown_table(["length", "mean loss", "loss in last bucket"],
                               [[L, sum(c["loss"]) / len(c["loss"]), c["loss"][-1]] for L, c in curves.items()])
    else:
        xs = None if a.xs is None else _floats(a.xs, "--xs")
        res = evaluate_task(model, task, lengths, xs, n_samples=a.samples, seed=a.seed, batch_size=a.batch_size)
        result = {"run_dir": str(a.run_dir), **settings, **res}
        plot_heatmap(out / f"{task.name}.png", res["accuracy"], row_labels=res["lengths"], col_labels=res["xs"],
                     xlabel=task.axis, ylabel="length", title=f"{cfg.name}: {task.name} accuracy")
        table = markdown_table(["length", *[f"{task.axis} {x:g}" for x in res["xs"]], "mean"],
                               [[L, *row, sum(row) / len(row)] for L, row in zip(res["lengths"], res["accuracy"])])
    write_json(out / f"{a.task}.json", result)
    (out / f"{a.task}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / (a.task + '.json')}")
    return result
