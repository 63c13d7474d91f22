"""Evaluation: reports (JSON, PNG plots, markdown tables)."""
