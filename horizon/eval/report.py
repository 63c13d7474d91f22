"""Report helpers: markdown tables, PNG line plots (matplotlib, Agg backend) and JSON results."""

from __future__ import annotations

import json
import pathlib
from typing import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(path: str | pathlib.Path, series: dict[str, tuple[Sequence, Sequence]], *, xlabel: str,
                ylabel: str, title: str = "", hlines: dict[str, float] | None = None) -> pathlib.Path:
    """One PNG with a line per series (name -> (x, y)) and optional labelled horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="gray", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(path: str | pathlib.Path, obj) -> None:
    pathlib.Path(path).write_text(json.dumps(obj, indent=2) + "\n")
