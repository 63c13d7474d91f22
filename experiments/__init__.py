"""Experiments: one module each, with `CONFIG = Experiment(...)` and `run(cfg) -> dict`.

Run one with `python -m experiments.NAME [overrides]` or `horizon run NAME [overrides]`.
"""
