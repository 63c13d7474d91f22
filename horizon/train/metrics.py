"""Metrics sinks: metrics.jsonl (one JSON object per record), TensorBoard events, progress bar."""

from __future__ import annotations

import json
import pathlib
import sys


class MetricsWriter:
    """Appends records to run_dir/metrics.jsonl and TensorBoard; `truncate_after(step)` on resume
    drops records of steps that will be recomputed, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: pathlib.Path, *, tensorboard: bool = True):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or not sys.stderr.isatty(),
                unit="step", dynamic_ncols=True)
