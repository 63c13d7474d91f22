"""Benchmarks: `python tools/bench.py <op> [--out FILE]`. Each op times horizon against its anchor
in the same process and reports ratios (these machines are noisy), written as JSON.

Each op lives in tools/benches/<op>.py with `run(args: list[str]) -> dict`."""

import importlib
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))


def available() -> list[str]:
    return sorted(p.stem for p in (_HERE / "benches").glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: tools/bench.py <op> [--out FILE] [op options]; ops: {', '.join(available())}")
        return 0 if argv else 2
    op, rest = argv[0], argv[1:]
    if op not in available():
        print(f"error: unknown benchmark {op!r}; choose one of {', '.join(available())}")
        return 2
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        out = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    result = importlib.import_module(f"tools.benches.{op}").run(rest)
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        pathlib.Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
