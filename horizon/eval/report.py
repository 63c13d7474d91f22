"""Report helpers: markdown tables, PNG line plots and heatmaps (matplotlib, Agg backend) and JSON results."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence


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


def plot_heatmap(path: str | pathlib.Path, values: Sequence[Sequence[float]], *, row_labels: Sequence,
                 col_labels: Sequence, xlabel: str, ylabel: str, title: str = "", vmin: float = 0.0,
                 vmax: float = 1.0) -> pathlib.Path:
    """One PNG heatmap of values[row][col] (e.g. accuracy by length x depth), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(col_labels), 2), 1.2 + 0.6 * max(len(row_labels), 2)),
                           dpi=100)
    im = ax.imshow(v, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center",
                    color="white" if v[i, j] < (vmin + vmax) / 2 else "black", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
