"""The `horizon` command: list | run | data build | eval | generate | aot.

`horizon run NAME [overrides]` and `python -m experiments.NAME [overrides]` are the same thing:
tyro parses overrides of the experiment's CONFIG (`--train.steps 200 --model.d-model 256
--run-dir DIR`). User errors print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pathlib
import pkgutil
import sys

from horizon.errors import USER_ERRORS, ExperimentNotFound


def experiment_names() -> list[str]:
    import experiments

    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_"))


def load_experiment(name: str):
    names = experiment_names()
    if name not in names:
        raise ExperimentNotFound(f"unknown experiment {name!r}; available: {', '.join(names)}")
    return importlib.import_module(f"experiments.{name}")


def _one_line_tyro_error(text: str) -> str:
    """Reduce tyro's boxed parse error to one line: the box's body up to its first rule."""
    body = []
    for raw in text.splitlines()[1:]:  # the first line is the box's title
        line = raw.strip(" │╭╮╰╯┃")
        if not line.strip("─━ ") or line.startswith("For full helptext"):
            if body:
                break
            continue
        body.append(line.strip())
    return " ".join(body) or "could not parse the arguments; see --help"


def parse_overrides(default, argv: list[str], prog: str):
    """The experiment config `default` with command-line overrides applied (tyro)."""
    import tyro

    if any(a in ("-h", "--help") for a in argv):
        return tyro.cli(type(default), default=default, args=argv, prog=prog)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(type(default), default=default, args=argv, prog=prog)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        print(f"error: {_one_line_tyro_error(err.getvalue())}", file=sys.stderr)
        raise SystemExit(2) from None


def run_experiment(module, argv: list[str], prog: str):
    cfg = parse_overrides(module.CONFIG, argv, prog)
    return module.run(cfg)


def _user_errors_exit(fn):
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def experiment_main(module_name: str, argv: list[str] | None = None) -> None:
    """Entry point of `python -m experiments.NAME`."""
    name = module_name.rsplit(".", 1)[-1]
    module = sys.modules[module_name]
    if name == "__main__":
        name = pathlib.Path(module.__file__).stem
    argv = sys.argv[1:] if argv is None else argv
    _user_errors_exit(lambda: run_experiment(module, argv, f"python -m experiments.{name}"))


USAGE = """usage: horizon <command> [...]

commands:
  list                         experiments with the claim each reproduces
  run NAME [overrides]         run an experiment (overrides: --train.steps 200, --run-dir DIR, ...; NAME --help lists them)
  data build [--source DIR] --out PATH [--overwrite]
                               build a token store from text files (default: this Python's stdlib)
  eval RUN_DIR --task NAME --lengths 512,1024 [...]
                               a long-context task or the loss-by-position curve on a saved run (eval --help)
  generate RUN_DIR --prompt TEXT [--cache streaming --cache-size 256] [--max-new-tokens N]
                               sample from a saved run with a KV cache, streaming tokens (generate --help)
  aot --model PRESET --mesh fsdp=8,tensor=8 --seq-len N
                               compile the train step for a topology you do not have; per-device memory
"""


def _cmd_list(argv):
    for name in experiment_names():
        mod = load_experiment(name)
        print(f"{name:24s} {getattr(mod.CONFIG, 'claim', '')}")


def _cmd_run(argv):
    if not argv or argv[0].startswith("-"):
        raise ExperimentNotFound(f"horizon run needs an experiment name; available: {', '.join(experiment_names())}")
    mod = load_experiment(argv[0])
    run_experiment(mod, argv[1:], f"horizon run {argv[0]}")


def _cmd_data(argv):
    import argparse

    from horizon.data.corpus import build_store

    p = argparse.ArgumentParser(prog="horizon data build")
    p.add_argument("action", choices=["build"])
    p.add_argument("--source", default=None, help="folder of text files (default: the stdlib's .py files)")
    p.add_argument("--out", required=True, help="where to write the store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    a = p.parse_args(argv)
    store = build_store(a.out, source=a.source, overwrite=a.overwrite)
    print(f"wrote {store.path}: {store.manifest['n_docs']} documents, {store.manifest['n_tokens']} tokens")


def _cmd_eval(argv):
    from horizon.eval.cli import main as eval_main

    eval_main(argv)


def _cmd_generate(argv):
    from horizon.infer.cli import main as generate_main

    generate_main(argv)


COMMANDS = {"list": _cmd_list, "run": _cmd_run, "data": _cmd_data, "eval": _cmd_eval, "generate": _cmd_generate,
            "aot": lambda argv: importlib.import_module("horizon.train.aot").main(argv)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    _user_errors_exit(lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
